"""The pipeline's report card: one Markdown page with plots, gathered from the stages' ``summary.json`` files.

Nothing here computes a figure: every number comes from a stage's summary (written by ``pipeline.py`` next to
the stage's output), and the curves from the metrics file a summary names. A stage without a summary shows as
"not run".
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Optional

from model.logging_utils import read_jsonl
from model.quality import COPY_ONSET_NATS, copy_onset
from model.training.plots import plot_curves

VERSIONS = ("torch", "transformers", "accelerate", "tokenizers", "peft", "datasets", "pyarrow")


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def gather(root: Path) -> dict[str, dict]:
    """{stage name: its summary} for every ``summary.json`` under ``root``; each gets ``_dir``, its folder."""
    out = {}
    for f in sorted(Path(root).rglob("summary.json")):
        s = _load(f)
        if isinstance(s, dict) and s.get("stage"):
            out[s["stage"]] = dict(s, _dir=f.parent)
    return out


def _figures(summaries: dict, stage: str) -> dict:
    return (summaries.get(stage) or {}).get("figures") or {}


def _metrics_file(summaries: dict, stage: str) -> Optional[Path]:
    s = summaries.get(stage) or {}
    name = (_figures(summaries, stage).get("files") or {}).get("metrics")
    return s["_dir"] / name if name and (s["_dir"] / name).is_file() else None


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "" if x is None else str(x)


def _bar_png(labels: list[str], series: dict[str, list[float]], png: Path, title: str, stacked: bool = True):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) + 2), 4))
    bottom = np.zeros(len(labels))
    width = 0.8 if stacked else 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        v = np.asarray(vals, dtype=float)
        if stacked:
            ax.bar(labels, v, bottom=bottom, label=name)
            bottom += v
        else:
            ax.bar(np.arange(len(labels)) + i * width, v, width=width, label=name)
    if not stacked:
        ax.set_xticks(np.arange(len(labels)) + width * (len(series) - 1) / 2, labels)
    ax.set_title(title)
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def data_section(summaries: dict, plots: Path) -> str:
    rep = _figures(summaries, "data")
    if not rep.get("sources") or not rep.get("totals"):
        return "## Data\n\nnot run\n"
    reasons = list(next(iter(rep["sources"].values()))["dropped"].keys()) if rep["sources"] else []
    rows = []
    for name, s in rep["sources"].items():
        rows.append([name, _fmt(s["rows_read"]), _fmt(s["kept"])] + [_fmt(s["dropped"][r]) for r in reasons]
                    + [_fmt(s["chars_in"]), _fmt(s["chars_out"])])
    t = rep["totals"]
    rows.append(["**total**", _fmt(t["rows_read"]), _fmt(t["kept"])] + [_fmt(t["dropped"][r]) for r in reasons]
                + [_fmt(t["chars_in"]), _fmt(t["chars_out"])])
    names = list(rep["sources"])
    series = {"kept": [rep["sources"][n]["kept"] for n in names]}
    for r in reasons:
        series[f"dropped: {r}"] = [rep["sources"][n]["dropped"][r] for n in names]
    _bar_png(names, series, plots / "data_counts.png", "rows by source: kept and dropped by reason")
    outputs = ", ".join(f"`{k}` {_fmt(v)}" for k, v in (rep.get("outputs") or {}).items())
    return ("## Data\n\n" + _table(["source", "read", "kept"] + reasons + ["chars in", "chars out"], rows)
            + f"\n\nOutputs: {outputs}. Read = kept + dropped: {t.get('adds_up')}.\n\n"
            + "![data counts](plots/data_counts.png)\n")


def tokenizer_section(summaries: dict) -> str:
    f = _figures(summaries, "tokenizer")
    if not f:
        return "## Tokenizer\n\nnot run\n"
    cpt = f.get("chars_per_token")
    lines = [f"- vocabulary: {_fmt(f.get('vocab_size'))} tokens ({f.get('token_type') or '?'} level)",
             f"- characters per token on the validation split: {_fmt(cpt) if cpt else 'n/a'}",
             f"- distinct pieces counted: {_fmt(f.get('distinct_pieces'))}, texts: {_fmt(f.get('texts'))}"]
    return "## Tokenizer\n\n" + "\n".join(lines) + "\n"


def curves_section(summaries: dict, plots: Path) -> str:
    parts = ["## Training curves\n"]
    for stage in ("copy_warmup", "pretrain", "sft", "dpo")[0 if "copy_warmup" in summaries else 1:]:
        m = _metrics_file(summaries, stage)
        if m is None:
            parts.append(f"- {stage}: not run")
            continue
        rows = read_jsonl(m)
        keys = ["loss", "eval_loss", "eval_bpc", "lr"] if stage != "dpo" else [
            f"{split}{k}" for k in ("loss", "rewards/margins", "rewards/accuracies") for split in ("", "eval/")]
        png = plot_curves(m, plots / f"{stage}_curves.png", keys=keys, title=stage)
        last = next((r for r in reversed(rows) if "loss" in r), {})
        evals = [r for r in rows if "eval_loss" in r]
        desc = f"- {stage}: {len(rows)} log rows, last loss {_fmt(last.get('loss'))}"
        if evals:
            desc += f", last eval loss {_fmt(evals[-1]['eval_loss'])}"
        parts.append(desc)
        if png:
            parts.append(f"\n![{stage}](plots/{png.name})\n")
    return "\n".join(parts) + "\n"


def _save_axes(fig, axes, png: Path, xlabel: str = "step") -> None:
    """Grid, legend and x label on each axis, then the figure to ``png``."""
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def quality_section(summaries: dict, plots: Path) -> str:
    """Held-out bits per character of each trained stage against the character baselines (model/quality.py)."""
    rows, curves, bases = [], {}, {}
    for stage in ("pretrain", "sft"):
        m = _metrics_file(summaries, stage)
        if m is None:
            continue
        evals = [(r["step"], r["eval_bpc"]) for r in read_jsonl(m) if "eval_bpc" in r]
        b = _figures(summaries, stage)
        if not evals:
            continue
        curves[stage], bases[stage] = evals, b
        final = evals[-1][1]
        bigram = b.get("baseline_bigram_bpc")
        rows.append([stage, _fmt(evals[0][1]), _fmt(final), _fmt(min(v for _, v in evals)),
                     _fmt(b.get("baseline_unigram_bpc")), _fmt(bigram),
                     _fmt(bigram - final) if isinstance(bigram, float) else ""])
    if not rows:
        return "## Model quality (held-out bits per character)\n\nnot run\n"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (stage, pts) in zip(axes.flat, curves.items()):
        ax.plot(*zip(*pts), marker=".", label="model")
        base = bases[stage]  # each stage's baselines are counted on its own training text
        for k, style in (("baseline_unigram_bpc", ":"), ("baseline_bigram_bpc", "--")):
            if isinstance(base.get(k), float):
                ax.axhline(base[k], color="black", ls=style, label=k.replace("baseline_", "char ").replace("_bpc", ""))
        ax.set_title(f"{stage}: held-out bpc")
    _save_axes(fig, axes.flat, plots / "bpc.png")
    return ("## Model quality (held-out bits per character)\n\n"
            "Bits per character of the valid split's responses (never trained on), against a character unigram "
            "(add-one) and an interpolated Kneser-Ney character bigram estimated on the same training text "
            "(model/quality.py). Lower is better; the last column is how far the final model is below the bigram."
            "\n\n" + _table(["stage", "first eval bpc", "final bpc", "best bpc", "char unigram", "char bigram",
                              "bigram - final"], rows) + "\n\n![bpc](plots/bpc.png)\n")


def dpo_section(summaries: dict) -> str:
    m = _metrics_file(summaries, "dpo")
    if m is None:
        return "## DPO\n\nnot run\n"
    rows = read_jsonl(m)
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    out = []
    for r in rows:
        prefix = "eval/" if r.get("split") == "eval" else ""
        if r.get("split") not in ("eval", "train"):
            continue
        out.append([r.get("split"), _fmt(r.get("step"))] + [_fmt(r.get(prefix + k)) for k in keys])
    if len(out) > 12:
        out = out[:3] + [["...", ""] + [""] * len(keys)] + out[-8:]
    eval_on = next((r.get("eval_on") for r in rows if r.get("eval_on")), None)
    where = {"valid": "held-out pairs (prompts never trained on)", "train": "the training pairs (no held-out file)"}
    note = f"\n\nEval rows are measured on {where.get(eval_on, eval_on)}.\n" if eval_on else "\n"
    return ("## DPO\n\n" + _table(["split", "step", "loss", "margin", "accuracy", "chosen", "rejected"], out)
            + note)


def ceval_section(summaries: dict, plots: Path) -> str:
    res = _figures(summaries, "ceval")
    if not res.get("overall"):
        return "## C-Eval\n\nnot run\n"
    overall = res["overall"]
    cats = res.get("per_category") or {}
    rows = [[c, _fmt(v.get("subjects")), _fmt(v.get("n")), _fmt(v.get("accuracy"))] for c, v in cats.items()]
    plot = ""
    if cats:
        _bar_png(list(cats), {"accuracy": [v.get("accuracy") or 0.0 for v in cats.values()],
                              "chance": [overall.get("chance", 0.25)] * len(cats)},
                 plots / "ceval_categories.png", "C-Eval accuracy by category", stacked=False)
        plot = "\n![C-Eval by category](plots/ceval_categories.png)\n"
    return (f"## C-Eval\n\n{_fmt(overall.get('subjects'))} subjects, {_fmt(overall.get('n'))} questions, "
            f"average accuracy {_fmt(overall.get('accuracy'))} (chance {overall.get('chance', 0.25)}, 95% chance "
            f"interval {[round(x, 3) for x in overall.get('chance_interval_95', [])]})\n\n"
            + _table(["category", "subjects", "questions", "accuracy"], rows) + "\n" + plot)


def ie_section(summaries: dict, plots: Path, settings: Optional[dict] = None, side_by_side: bool = False) -> str:
    runs = _figures(summaries, "ie").get("runs") or {}
    if not runs:
        return "## Triple extraction\n\nnot run\n"
    keys = ("precision", "recall", "f1", "tp", "n_pred", "n_gold", "sentences", "unparsed")
    rows = [[k] + [_fmt(r["dev"].get(k)) for r in runs.values()] for k in keys]
    rows.append(["training steps"] + [_fmt(r.get("steps")) for r in runs.values()])
    rows.append(["wall minutes (data, probe, training, F1 curve)"]
                + [_fmt(r.get("train_minutes"), 1) for r in runs.values()])
    curves = {label: r["f1_curve"] for label, r in runs.items() if r.get("f1_curve")}
    plot = ""
    if curves:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, pts in curves.items():
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_ylabel("dev F1")
        ax.set_title("triple extraction: dev F1 during fine-tuning")
        _save_axes(fig, [ax], plots / "ie_f1.png", xlabel="update")
        steps = sorted({s for pts in curves.values() for s, _ in pts})
        table = _table(["update"] + list(curves), [[s] + [_fmt(dict(pts).get(s)) for pts in curves.values()]
                                                   for s in steps])
        plot = "\nF1 on the same dev sentences during training:\n\n" + table + "\n\n![ie f1](plots/ie_f1.png)\n"
    flags = " ".join(f"`--{k}={v}`" for k, v in (settings or {}).items() if k not in ("progress", "num_threads"))
    return ("## Triple extraction\n\nMicro P/R/F1 on DuIE dev sentences never trained on; both runs have the "
            "same training budget, so the gap is what pretraining is worth."
            + (f" Both runs: {flags}." if flags else "")
            + (_side_by_side((settings or {}).get("num_threads")) if side_by_side and len(runs) > 1 else "")
            + "\n\n"
            + _table(["metric"] + list(runs), rows) + "\n" + plot)


def _side_by_side(threads: Optional[int]) -> str:
    each = f"{threads} thread{'s' if threads != 1 else ''} each" if threads else "sharing the machine's threads"
    return f" The two runs ran side by side, {each}, for the same wall-clock budget."


def copy_section(summaries: dict, plots: Path) -> str:
    """The held-out copy figures at every evaluation: when the model acquired copying."""
    curves = {}
    for stage in ("copy_warmup", "pretrain", "sft"):
        m = _metrics_file(summaries, stage)
        if m is not None:
            rows = [r for r in read_jsonl(m) if "eval_copy_loss" in r]
            if rows:
                curves[stage] = rows
    if not curves:
        return ""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage, rows in curves.items():
        steps = [r["step"] for r in rows]
        a.plot(steps, [r["eval_copy_loss"] for r in rows], marker=".", label=stage)
        b.plot(steps, [r["eval_copy_rate"] for r in rows], marker=".", label=stage)
    a.axhline(COPY_ONSET_NATS, color="black", ls=":", label=f"onset ({COPY_ONSET_NATS:g} nat)")
    a.set_title("held-out copy loss (nats/token)")
    b.set_title("held-out exact copy rate")
    _save_axes(fig, (a, b), plots / "copy.png")
    parts = ["## Copying (held-out)\n\nAt every evaluation the model writes out again the first held-out "
             "targets of the valid split (cut to the copy length): copy loss in nats per token, and the share "
             "reproduced exactly by greedy decoding. The onset is the first evaluation whose copy loss is below "
             "1 nat.\n"]
    for stage, rows in curves.items():
        parts.append(f"- {stage}: onset at step {_fmt(copy_onset(rows))}; final copy loss "
                     f"{_fmt(rows[-1]['eval_copy_loss'])}, exact copy rate {_fmt(rows[-1]['eval_copy_rate'])}\n\n"
                     + _table(["step", "copy loss", "copy rate"],
                              [[r["step"], _fmt(r["eval_copy_loss"]), _fmt(r["eval_copy_rate"])] for r in rows]))
    return "\n\n".join(parts) + "\n\n![copy](plots/copy.png)\n"


def chat_section(summaries: dict) -> str:
    res = _figures(summaries, "chat")
    if not res.get("samples"):
        return "## Sample chats\n\nnot run\n"
    parts = ["## Sample chats\n"]
    if res.get("heldout"):
        n_ok = sum(h["correct"] for h in res["heldout"])
        parts.append(f"Held-out questions (never in training): {n_ok} of {len(res['heldout'])} correct\n")
        parts.append(_table(["question", "answer", "expected", "correct"],
                            [[h["prompt"], h["answer"], h["expected"], h["correct"]] for h in res["heldout"]]))
        parts.append("")
    parts.append(_table(["prompt", "answer", "top token share"],
                        [[s["prompt"], s["answer"].replace("\n", " "), _fmt(s.get("top_token_share"), 2)]
                         for s in res["samples"]]))
    if "distinct_2" in res:
        parts.append(f"\nDegenerate answers (one token over 30% of the answer's tokens): {res['degenerate']} of "
                     f"{len(res['samples'])}; distinct-2 over the answers: {_fmt(res['distinct_2'])}. Decoding: "
                     f"the model folder's generation_config.json ({res.get('generation', '')}).")
    passage = res.get("passage")
    if passage:
        parts.append(f"\nQuestions about a given passage (cmrc2018 dev, held out of every training file; the answer "
                     f"is a span of the passage): {passage['contains_gold']} of {passage['n']} answers contain a "
                     f"gold span.\n")
        parts.append(_table(["question (end of prompt)", "answer", "gold", "contains gold"],
                            [[q["prompt"].split("问题：")[-1], q["answer"].replace("\n", " "), " / ".join(q["answers"]),
                              q["contains_gold"]] for q in passage["questions"][:8]]))
    grid = (_figures(summaries, "final").get("decoding") or {}).get("grid")
    if grid:
        d = _figures(summaries, "final")["decoding"]
        bound = d.get("max_degenerate", 0.05)
        chosen = next((g for g in grid if all(g[k] == v for k, v in d.get("chosen", {}).items())), None)
        met = chosen is not None and chosen["degenerate"] <= bound * chosen["answers"]
        rule = (f"the mildest setting with at most {bound:.0%} degenerate answers" if met else
                f"no setting reached {bound:.0%} degenerate answers, so the one with the fewest")
        parts.append(f"\nThose defaults were chosen by eval/decoding.py on {d['n']} held-out prompts of the valid split "
                     f"(not the prompts above): {rule}.\n")
        parts.append(_table(["repetition penalty", "no-repeat n-gram", "degenerate", "distinct-2", "mean tokens"],
                            [[g["repetition_penalty"], g["no_repeat_ngram_size"], f"{g['degenerate']} of {g['answers']}",
                              _fmt(g["distinct_2"]), g["mean_tokens"]] for g in grid]))
    return "\n".join(parts) + "\n"


def stages_section(summaries: dict) -> str:
    rows, total = [], 0.0
    for m in sorted(summaries.values(), key=lambda m: m.get("finished", "")):
        total += m.get("wall_s") or 0.0
        rows.append([m["stage"], _fmt(m.get("wall_s"), 1), _fmt(m.get("peak_rss_mb"), 0), m.get("finished", "")])
    return ("## Wall time and peak memory per stage\n\n" + _table(["stage", "wall s", "peak RSS MB", "finished"], rows)
            + f"\n\nTotal: {total:.0f} s ({total / 60:.1f} min). Peak RSS is the stage's own process tree "
            "(empty for stages run inside the pipeline process).\n")


def versions_section(cfg) -> str:
    vers = []
    for pkg in VERSIONS:
        try:
            vers.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    cfg_json = json.dumps(cfg.__dict__, ensure_ascii=False, indent=1, default=str)
    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        device = "torch not installed"
    return (f"## Versions and config\n\nPython {platform.python_version()}, {', '.join(vers)}, "
            f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, {device}\n\n"
            f"```json\n{cfg_json}\n```\n")


def write_report_card(cfg) -> Path:
    root = Path(cfg.root)
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    summaries = gather(root)
    sections = [f"# Report card: profile `{cfg.profile}`\n", data_section(summaries, plots),
                tokenizer_section(summaries), quality_section(summaries, plots), copy_section(summaries, plots),
                curves_section(summaries, plots),
                dpo_section(summaries), ceval_section(summaries, plots),
                ie_section(summaries, plots, cfg.ie, cfg.ie_parallel),
                chat_section(summaries), stages_section(summaries), versions_section(cfg)]
    out = root / "report.md"
    out.write_text("\n".join(sections), encoding="utf-8")
    if cfg.publish_dir:
        publish(root, Path(cfg.publish_dir))
    return out


def publish(root: Path, dest: Path) -> Path:
    """Copy the report card (text and plots only, never weights) to e.g. docs/ for committing."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "report.md", dest / "report.md")
    (dest / "plots").mkdir(exist_ok=True)
    for png in (root / "plots").glob("*.png"):
        shutil.copy2(png, dest / "plots" / png.name)
    return dest
