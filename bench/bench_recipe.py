"""Recipe study: pretraining configurations at equal wall time on this machine, judged by held-out bpc.

Every run pretrains from scratch on the `cpu` profile's data (all of ../shared/data through the data stage) for
the same wall-clock budget with the same threads, and is scored by bits per character on the same held-out
targets (the valid split's responses, 128 tokens), against a character unigram and a Kneser-Ney character
bigram estimated on the same training text (model/quality.py). The step count of each run comes from a short
timing probe of that configuration, so a cosine schedule ends where the budget does.

    python bench/bench_recipe.py                 # every configuration, 90 s each (~40 min on 2 cores)
    python bench/bench_recipe.py --quick         # three configurations, 30 s each
    python bench/bench_recipe.py --only=mini,lr_1e-2 --budget_s=300
    python bench/bench_recipe.py --only=mixes --budget_s=420    # the copy mixes of the `cpu` model

Writes ``<out>/results.jsonl`` (one line per run), ``<out>/recipe.png`` (held-out bpc against training time) and
prints the table; the last line is one JSON object {"bench": "recipe", "ratio": bigram bpc / best bpc, "bpc":
{run: bpc}, ...}: a ratio above 1 means the best run beats the bigram.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire

from config import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]

MINI = dict(d_model=256, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64, d_ff=1024)
TINY = dict(d_model=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32, d_ff=512)
# The base of every variant: a ~6M-parameter T5 at lr 3e-3, no dropout, prefix LM, 128+128 tokens.
BASE = dict(preset="small", model_overrides=MINI, dropout_rate=0.0, learning_rate=3e-3, optimizer="adamw",
            text_mode="prefix", max_source_len=128, max_target_len=128, batch_size_per_gpu=16, group_by_length=True)
CONFIGS: dict[str, dict] = {
    # the `cpu` profile before this study: 42M parameters, dropout 0.1, lr 7e-4
    "cpu_profile_before": dict(BASE, model_overrides={}, dropout_rate=0.1, learning_rate=7e-4),
    "mini": dict(BASE),
    "size_tiny": dict(BASE, model_overrides=TINY),
    "size_small": dict(BASE, model_overrides={}),
    "tiny_lr_1e-2": dict(BASE, model_overrides=TINY, learning_rate=1e-2),
    "tiny_heads_8": dict(BASE, model_overrides=dict(TINY, num_heads=8, d_kv=16)),
    "ffn_gated_gelu": dict(BASE, model_overrides=dict(MINI, feed_forward_proj="gated-gelu")),
    "dropout_0.1": dict(BASE, dropout_rate=0.1),
    "lr_1e-3": dict(BASE, learning_rate=1e-3),
    "lr_1e-2": dict(BASE, learning_rate=1e-2),
    "adafactor_1e-2": dict(BASE, optimizer="adafactor", learning_rate=1e-2),
    "objective_span": dict(BASE, text_mode="span"),
    "objective_mix": dict(BASE, text_mode="mix"),
    "tiny_prefix_denoise": dict(BASE, model_overrides=TINY, text_mode="prefix+denoise"),
    "seq_64": dict(BASE, max_source_len=64, max_target_len=64),
    "batch_32": dict(BASE, batch_size_per_gpu=32),
    "no_length_grouping": dict(BASE, group_by_length=False),
    "vocab_4096": dict(BASE, tokenizer="4096"),
}
# The `cpu` profile's model with objective mixes that practise copying (docs/recipe.md "Copying"): text rows
# split into prefix -> continuation, denoising (whole-window targets) and plain copies at the stated shares.
CPU = dict(BASE, model_overrides=dict(TINY, num_heads=8, d_kv=16), copy_eval_samples=64)
MIXES: dict[str, dict] = {
    "cpu_prefix": dict(CPU),
    "cpu_prefix_copy": dict(CPU, text_mode="prefix:1+copy:1"),
    "cpu_prefix_denoise_copy": dict(CPU, text_mode="prefix:2+denoise:1+copy:1"),
    "cpu_prefix_denoise": dict(CPU, text_mode="prefix+denoise"),
}
CONFIGS.update(MIXES)
QUICK = ("mini", "lr_1e-2", "objective_span")
EVAL_LEN = 128


def _prepare(out: Path, vocabs=("8192", "4096")) -> tuple[Path, dict]:
    """The data stage and the tokenizers the runs use (8,192 and 4,096 ids), once; later runs reuse them."""
    py = sys.executable
    data = out / "data"
    if not (data / "my_train_dataset.parquet").is_file():
        subprocess.run([py, "-m", "utils.raw_data_process", "--config=data/sources/shared_all.yaml",
                        f"--output_dir={data}", "--quiet=True"], cwd=ROOT, check=True)
    toks = {}
    for v in vocabs:
        d = out / f"tokenizer_{v}"
        if not (d / "tokenizer.json").is_file():
            subprocess.run([py, "train_tokenizer.py", f"--inputs={data / 'my_corpus.txt'}", f"--output_dir={d}",
                            f"--vocab_size={v}", "--token_type=char"], cwd=ROOT, check=True)
        toks[v] = d
    return data, toks


def _config(name: str, spec: dict, data: Path, toks: dict, out: Path, steps: int, eval_every: int,
            max_eval: int, threads: int):
    from model.training.trainer import train_config
    spec = dict(spec)
    tok = toks[spec.pop("tokenizer", "8192")]
    cfg = train_config("pretrain", **spec, train_file=f"{data / 'my_text_dataset.parquet'}:1,"
                                                    f"{data / 'my_train_dataset.parquet'}:1",
                       valid_file=str(data / "my_valid_dataset.parquet"),
                       tokenizer_dir=str(tok), output_dir=str(out / name), max_steps=steps, warmup_steps=0.05,
                       eval_steps=eval_every, save_steps=0, logging_steps=max(1, min(20, steps)),
                       max_eval_samples=max_eval, eval_max_source_len=EVAL_LEN, eval_max_target_len=EVAL_LEN,
                       bleu_samples=0, num_threads=threads, log_with="none", show_progress=False, save_best=False)
    return cfg


def _plot(results: list[dict], out: Path, png: Path, budget_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.logging_utils import read_jsonl
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        rows = read_jsonl(out / r["run"] / "metrics.jsonl")  # x: training seconds, eval time left out
        pts = [(x["step"] / r["steps"] * budget_s, x["eval_bpc"]) for x in rows if "eval_bpc" in x]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=f"{r['run']} ({r['bpc']:.2f})")
    b = results[0]
    ax.axhline(b["baseline_unigram_bpc"], color="grey", ls="--", label=f"char unigram ({b['baseline_unigram_bpc']:.2f})")
    ax.axhline(b["baseline_bigram_bpc"], color="black", ls="--", label=f"char bigram KN ({b['baseline_bigram_bpc']:.2f})")
    ax.set_xlabel(f"seconds of training ({results[0].get('threads', 2)} threads; evaluation not counted)")
    ax.set_ylabel("held-out bits per character")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def power_law_fit(xs, ys) -> dict:
    """Least-squares fit of ``y = a + b * x**-c`` (grid over c, linear least squares for a, b)."""
    import numpy as np
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    best = None
    for c in np.linspace(0.05, 1.5, 291):
        A = np.stack([np.ones_like(x), x ** -c], axis=1)
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        err = float(((A @ coef - y) ** 2).sum())
        if best is None or err < best["sse"]:
            best = {"a": float(coef[0]), "b": float(coef[1]), "c": float(c), "sse": err}
    return best


def extrapolate(metrics: str, target_bpc: float, tokens_per_step: float = 0.0) -> dict:
    """Fit held-out bpc against steps from a run's metrics.jsonl and say where it would reach ``target_bpc``."""
    from model.logging_utils import read_jsonl
    rows = [r for r in read_jsonl(metrics) if "eval_bpc" in r and r.get("step")]
    fit = power_law_fit([r["step"] for r in rows], [r["eval_bpc"] for r in rows])
    out = dict(fit, points=len(rows), last_step=rows[-1]["step"], last_bpc=rows[-1]["eval_bpc"],
               floor_bpc=round(fit["a"], 3))
    if fit["a"] < target_bpc and fit["b"] > 0:
        steps = ((target_bpc - fit["a"]) / fit["b"]) ** (-1 / fit["c"])
        out["steps_to_target"] = int(steps)
        out["budget_multiple"] = round(steps / rows[-1]["step"], 1)
        if tokens_per_step:
            out["tokens_to_target"] = int(steps * tokens_per_step)
    return out


def main(quick: bool = False, budget_s: float = 0, only: str | tuple = "", out: str = "model_save/bench_recipe",
         threads: int = 2, max_eval_samples: int = 0, probe_steps: int = 24, png: str = "") -> None:
    budget_s = budget_s or (30 if quick else 90)
    max_eval = max_eval_samples or (128 if quick else 512)
    names = [n for n in (only.split(",") if isinstance(only, str) else only) if n] or \
        (list(QUICK) if quick else list(CONFIGS))
    names = [m for n in names for m in (MIXES if n == "mixes" else [n])]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    out_p = (ROOT / out) if not Path(out).is_absolute() else Path(out)
    from model.training.trainer import probe_seconds_per_step, train
    data, toks = _prepare(out_p, sorted({CONFIGS[n].get("tokenizer", "8192") for n in names}))
    results = []
    for name in names:
        cfg = _config(name, CONFIGS[name], data, toks, out_p, probe_steps, 0, 0, threads)
        s_per_step = probe_seconds_per_step(cfg, steps=probe_steps)
        steps = max(4, int(budget_s / s_per_step))
        t = time.perf_counter()
        evals = 8 if "copy_eval_samples" in CONFIGS[name] else 4  # the copy onset needs a finer grid
        r = train(_config(name, CONFIGS[name], data, toks, out_p, steps, max(1, steps // evals), max_eval, threads))
        row = {"run": name, "bpc": round(r["eval_bpc"], 4), "eval_loss": round(r["eval_loss"], 4),
               "params": r["params"], "steps": steps, "train_tokens": r["train_tokens"],
               "s_per_step": round(s_per_step, 4), "pad_share": r["pad_share"],
               "tokens_per_s": round(r["train_tokens"] / (steps * s_per_step)),  # evaluation time left out
               "wall_s": round(time.perf_counter() - t, 1), "baseline_unigram_bpc": r["baseline_unigram_bpc"],
               "baseline_bigram_bpc": r["baseline_bigram_bpc"]}
        if "eval_copy_loss" in r:
            from model.logging_utils import read_jsonl
            from model.quality import copy_onset
            evals = [x for x in read_jsonl(out_p / name / "metrics.jsonl") if "eval_copy_loss" in x]
            row.update(copy_loss=round(r["eval_copy_loss"], 4), copy_rate=round(r["eval_copy_rate"], 4),
                       copy_onset_eval_step=copy_onset(evals),
                       copy_curve=[[x["step"], round(x["eval_copy_loss"], 3), round(x["eval_copy_rate"], 3)]
                                   for x in evals])
        results.append(row)
        print(json.dumps(row), flush=True)
    (out_p / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    _plot(results, out_p, Path(png) if png else out_p / "recipe.png", budget_s)
    print(f"\n{'run':22s} {'params':>10s} {'steps':>6s} {'tokens':>10s} {'tok/s':>7s} {'pad':>5s} {'bpc':>7s}")
    for r in results:
        print(f"{r['run']:22s} {r['params']:>10,d} {r['steps']:>6d} {r['train_tokens']:>10,d} {r['tokens_per_s']:>7,d} "
              f"{r['pad_share']:>5.2f} {r['bpc']:>7.3f}")
    best = min(results, key=lambda r: r["bpc"])
    b = results[0]
    print(f"char unigram {b['baseline_unigram_bpc']:.3f} bpc, char bigram (KN) {b['baseline_bigram_bpc']:.3f} bpc")
    summary = {"bench": "recipe", "ratio": round(b["baseline_bigram_bpc"] / best["bpc"], 4), "best": best["run"],
               "bpc": {r["run"]: r["bpc"] for r in results}, "budget_s": budget_s, "threads": threads,
               "copy_rate": {r["run"]: r["copy_rate"] for r in results if "copy_rate" in r},
               "copy_onset_eval_step": {r["run"]: r["copy_onset_eval_step"] for r in results if "copy_rate" in r},
               "baseline_unigram_bpc": round(b["baseline_unigram_bpc"], 4),
               "baseline_bigram_bpc": round(b["baseline_bigram_bpc"], 4), "data": str(SHARED_DATA)}
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire({"run": main, "extrapolate": extrapolate} if sys.argv[1:2] == ["extrapolate"] else main)
