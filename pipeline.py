"""One command from raw data to a chat model, with a report card.

    python pipeline.py --profile demo          # embedded demo data, tiny model, < 10 min on 2 cores (make demo)
    python pipeline.py --profile cpu           # all of ../shared/data, 2M model, about an hour on 2 cores (56 min measured)
    python pipeline.py --profile gpu           # the reference's base model and batch sizes, 1-2 GPUs
    python pipeline.py --profile demo --force sft,dpo     # redo some stages
    python pipeline.py --profile cpu --only report        # rebuild the report card only
    python pipeline.py --profile gpu --dry_run=True       # the gpu profile, a few steps per stage, on any machine
    python pipeline.py --profile gpu --dry_run=shapes     # ... at its real model, vocabulary and lengths, on a CPU

Stages run as the same commands a user would type (printed as they run). Finished stages are skipped (and say
so); a stopped run continues from the stage, and the trainers from the checkpoint, where it stopped. Any
PipelineConfig field is a flag (``--root=model_save/try2``; ``--help`` lists them).

Each stage writes ``summary.json`` next to its output: the command lines, wall time and peak RSS (from
``os.wait4`` on the stage's own processes, so each stage's memory is its own), and the figures it reports with
the files they come from. A stage is complete when its summary and its outputs exist; the report card
(``eval/report_card.py``) only gathers the summaries. A table of each stage's wall time and peak RSS ends the run.
"""
from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from config import (PIPELINE_PROFILES, TRAIN_PRESETS, InferConfig, PipelineConfig, dry_run_profile, make_config,
                    run_cli)
from eval.report_card import write_report_card
from model.logging_utils import read_jsonl
from model.quality import copy_onset, distinct_n, is_degenerate, top_token_share

PY = [sys.executable]
console = Console()
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------- runner
@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    outputs: list[str]
    description: str = ""
    # extra arguments appended to the LAST command when a previous attempt left partial work behind
    resume_args: list[str] = field(default_factory=list)
    # run after the commands: in-process work (sample chats) or reading the figures the stage reports
    after: Optional[Callable[[], dict]] = None
    # the folder of the stage's output, where its summary.json goes (default: <state dir>/<name>)
    out_dir: Optional[str] = None
    # run the commands side by side (each its own log, <name>.<i>.log) instead of one after the other
    parallel: bool = False


def summary_path(state_dir: Path, stage: Stage) -> Path:
    return Path(stage.out_dir) / SUMMARY if stage.out_dir else Path(state_dir) / stage.name / SUMMARY


def stage_complete(state_dir: Path, stage: Stage) -> bool:
    return summary_path(state_dir, stage).is_file() and all(Path(o).exists() for o in stage.outputs)


def run_command(cmd: list[str], log_file: Path, env: Optional[dict] = None, prefix: str = "") -> dict:
    """Run one command, tee its output to a log (on the console each line after ``prefix``), and return wall
    time, peak RSS and exit status."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(prefix + line)
            log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": shlex.join(cmd), "returncode": proc.returncode, "wall_s": round(time.time() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run_stages(stages: list[Stage], state_dir: str | Path, force: tuple[str, ...] = (),
               only: tuple[str, ...] = (), env: Optional[dict] = None) -> dict:
    """Run the stages in order (logs in ``state_dir``); returns {stage: summary}. Raises on the first failing
    command."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    results = {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        summary = summary_path(state, stage)
        if stage.name not in force and stage_complete(state, stage):
            console.print(f"[bold green]✓ {stage.name}[/]: already complete ({summary}), skipped")
            results[stage.name] = json.loads(summary.read_text(encoding="utf-8"))
            continue
        started = state / f"{stage.name}.started"
        resuming = started.exists() and stage.name not in force
        console.rule(f"[bold]{stage.name}[/] {stage.description}" + (" (resuming)" if resuming else ""))
        started.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        commands = [cmd + (stage.resume_args if resuming and i == len(stage.commands) - 1 else [])
                    for i, cmd in enumerate(stage.commands)]
        t0 = time.time()
        runs = (_run_side_by_side if stage.parallel else _run_in_turn)(commands, state, stage.name, env)
        figures = stage.after() if stage.after else None
        wall_s = time.time() - t0
        missing = [o for o in stage.outputs if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} finished but did not write {', '.join(missing)}")
        info = {"stage": stage.name, "description": stage.description, "commands": runs,
                "wall_s": round(wall_s, 2),
                # in-process steps share the pipeline's own memory: no separate figure for them; commands side by
                # side count their peaks added (a bound: the peaks need not coincide)
                "peak_rss_mb": (sum if stage.parallel else max)([r["peak_rss_mb"] for r in runs]) if runs else None,
                "pipeline_peak_rss_mb": _own_peak_rss_mb(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "figures": figures}
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(info, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
        started.unlink(missing_ok=True)
        results[stage.name] = info
        rss = f", peak RSS {info['peak_rss_mb']:.0f} MB" if info["peak_rss_mb"] is not None else ""
        console.print(f"[green]{stage.name} done in {info['wall_s']:.1f} s{rss}[/]")
    return results


def _run_in_turn(commands: list[list[str]], state: Path, name: str, env: Optional[dict]) -> list[dict]:
    runs = []
    for cmd in commands:
        console.print(f"[cyan]$ {shlex.join(cmd)}[/]")
        runs.append(run_command(cmd, state / f"{name}.log", env=env))
        _raise_if_failed(runs[-1], name, state / f"{name}.log")
    return runs


def _run_side_by_side(commands: list[list[str]], state: Path, name: str, env: Optional[dict]) -> list[dict]:
    """All commands at once, each with its own log and a [i] before its console lines; raises once all ended."""
    from concurrent.futures import ThreadPoolExecutor
    logs = [state / f"{name}.{i}.log" for i in range(len(commands))]
    for i, cmd in enumerate(commands):
        console.print(f"[cyan][{i}] $ {shlex.join(cmd)}[/]")
    with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
        runs = list(pool.map(lambda i: run_command(commands[i], logs[i], env=env, prefix=f"[{i}] "),
                             range(len(commands))))
    for r, log in zip(runs, logs):
        _raise_if_failed(r, name, log)
    return runs


def _raise_if_failed(r: dict, name: str, log: Path) -> None:
    if r["returncode"] != 0:
        raise RuntimeError(f"stage {name!r} failed (exit {r['returncode']}) running: {r['cmd']}\n"
                           f"see {log}; run the pipeline again to resume")


def _own_peak_rss_mb() -> float:
    """The pipeline process's peak RSS so far, an upper bound for its in-process steps (the chat stage loads the
    model in this process, so no command's figure covers it)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_stage_table(results: dict) -> None:
    """Wall time and peak RSS of every stage in one table, so a dry run's memory per stage reads at a glance."""
    table = Table(title="stages")
    for col in ("stage", "wall s", "peak RSS MB", "pipeline peak RSS MB so far"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    for name, info in results.items():
        table.add_row(name, *(fmt(info.get(k)) for k in ("wall_s", "peak_rss_mb", "pipeline_peak_rss_mb")))
    console.print(table)


# ------------------------------------------------------------------------------------------- figures
def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _metrics_rows(out_dir: Path) -> list[dict]:
    """The rows of a stage's metrics.jsonl; none when the stage has not logged yet."""
    path = Path(out_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def data_figures(data_dir: Path) -> dict:
    """Rows read, kept and dropped by reason, per source and in total (from report.json)."""
    rep = _read_json(data_dir / "report.json")
    return {k: rep.get(k) for k in ("sources", "totals", "outputs")}


def tokenizer_figures(tok_dir: Path, valid_file: Path) -> dict:
    """Vocabulary, counting figures, and characters per token on (up to 1,000 rows of) the validation split."""
    import pandas as pd

    from model.tokenizer.build import load_tokenizer
    stats = _read_json(tok_dir / "training_stats.json")
    tok = load_tokenizer(tok_dir)
    out = {k: stats[k] for k in ("distinct_pieces", "texts", "chars", "count_seconds", "train_seconds") if k in stats}
    out.update(vocab_size=len(tok), token_type=stats.get("token_type", tok.init_kwargs.get("token_type")),
               chars_per_token=None)
    if valid_file.is_file():
        df = pd.read_parquet(valid_file).head(1000)
        texts = [t for t in list(df["prompt"]) + list(df["response"]) if isinstance(t, str) and t]
        n_tok = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
        out["chars_per_token"] = sum(len(t) for t in texts) / max(1, n_tok)
    return out


def trainer_figures(out_dir: Path) -> dict:
    """Last training loss, eval loss and held-out bpc with its character baselines, from metrics.jsonl."""
    rows = _metrics_rows(out_dir)
    last = next((r for r in reversed(rows) if "loss" in r), {})
    evals = [r for r in rows if "eval_loss" in r]
    base = next((r for r in rows if "baseline_bigram_bpc" in r), {})
    out = {"steps": max((r.get("step", 0) for r in rows), default=0), "loss": last.get("loss"),
           "eval_loss": evals[-1]["eval_loss"] if evals else None,
           "eval_bpc": next((r["eval_bpc"] for r in reversed(evals) if "eval_bpc" in r), None)}
    out.update({k: base[k] for k in ("baseline_unigram_bpc", "baseline_bigram_bpc") if k in base})
    copies = [r for r in evals if "eval_copy_loss" in r]
    if copies:  # the held-out copy figures; the onset is the first evaluation whose copy loss is below 1 nat
        out.update(eval_copy_loss=copies[-1]["eval_copy_loss"], eval_copy_rate=copies[-1]["eval_copy_rate"],
                   copy_onset_eval_step=copy_onset(copies))
    return {**out, "files": {"metrics": "metrics.jsonl"}}


def dpo_figures(out_dir: Path) -> dict:
    """The first and the last eval rows (reward accuracy and margin before and after)."""
    evals = [r for r in _metrics_rows(out_dir) if r.get("split") == "eval"]
    pick = lambda r: {k: v for k, v in r.items() if k.startswith("eval/") or k in ("step", "eval_on")}  # noqa: E731
    return {"eval_before": pick(evals[0]) if evals else None, "eval_after": pick(evals[-1]) if evals else None,
            "files": {"metrics": "metrics.jsonl"}}


def ceval_figures(out_dir: Path) -> dict:
    res = _read_json(out_dir / "results.json")
    return {k: res.get(k) for k in ("overall", "per_category")}


def ie_figures(root: Path, runs: dict[str, str]) -> dict:
    """Dev P/R/F1, steps and minutes of each IE run ({label: its folder under root})."""
    out = {}
    for label, folder in runs.items():
        s = _read_json(root / folder / "ie_scores.json")
        if isinstance(s.get("dev"), dict):
            out[label] = {"dev": s["dev"], "steps": (s.get("train") or {}).get("steps"),
                          "train_minutes": s.get("train_minutes"), "eval_minutes": s.get("eval_minutes"),
                          "f1_curve": s.get("f1_curve") or []}
    return {"runs": out}


# ------------------------------------------------------------------------------------------- stages
def _flags(d: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in d.items()]


def _launcher(cfg: PipelineConfig) -> list[str]:
    """``python`` for one process; ``accelerate launch ... --num_processes <GPUs on this machine>`` for GPUs.

    A dry run on a machine without GPUs launches 2 CPU processes (gloo), the same DDP code path as 2 GPUs.
    """
    if cfg.python == "python":
        return PY
    import torch
    gpus = torch.cuda.device_count()
    if gpus == 0:
        if not cfg.dry_run:
            return shlex.split(cfg.python)  # main() stops before running: no GPU here
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return shlex.split(cfg.python) + ["--num_processes", str(gpus)]


def _env(cfg: PipelineConfig) -> dict | None:
    """A dry run without GPUs: accelerate on the CPU, one thread per process."""
    import torch
    if cfg.dry_run and cfg.python != "python" and torch.cuda.device_count() == 0:
        return dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return None


def _preset(cfg: PipelineConfig) -> str:
    return cfg.pretrain.get("preset") or TRAIN_PRESETS.get(cfg.pretrain_stage, {}).get("preset", "small")


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    root = Path(cfg.root)
    return _data_stages(cfg) + _training_stages(cfg) + [
        _dpo_stage(cfg),
        Stage("final", [], [str(root / "model.safetensors")], "export the final model",
              after=lambda: export_final(cfg), out_dir=str(root)),
        _ceval_stage(cfg),
        ie_stage(cfg),
        Stage("chat", [], [], "held-out questions, sample chats, a sample API exchange",
              after=lambda: sample_chats(cfg), out_dir=str(root / "chat")),
        Stage("report", [], [str(root / "report.md")], "report card", after=lambda: report_card(cfg))]


def _data_stages(cfg: PipelineConfig) -> list[Stage]:
    """The demo data (when asked), the data stage and the tokenizer."""
    data_dir, tok_dir = Path(cfg.root) / "data", Path(cfg.root) / "tokenizer"
    stages: list[Stage] = []
    if cfg.demo_data:
        stages.append(Stage("demo_data", [PY + ["-m", "utils.demo_data", "--out_dir", "data/demo"]],
                            ["data/demo/sft.parquet", "data/demo/heldout.json"], "write the embedded demo data"))
    stages.append(Stage(
        "data", [PY + ["-m", "utils.raw_data_process", f"--config={cfg.data_config}", f"--output_dir={data_dir}",
                       "--quiet=True"] + _flags(cfg.data_overrides)],
        [str(data_dir / "report.json"), str(data_dir / "my_train_dataset.parquet")],
        "raw sources -> clean, deduplicated parquet + text corpus", after=lambda: data_figures(data_dir),
        out_dir=str(data_dir)))
    stages.append(Stage(
        "tokenizer", [PY + ["train_tokenizer.py", f"--inputs={data_dir / 'my_corpus.txt'}",
                            f"--output_dir={tok_dir}"] + _flags(cfg.tokenizer)],
        [str(tok_dir / "tokenizer.json")], "train the tokenizer on the text corpus",
        after=lambda: tokenizer_figures(tok_dir, data_dir / "my_valid_dataset.parquet"), out_dir=str(tok_dir)))
    return stages


def _train_stage(cfg: PipelineConfig, name: str, stage: str, out_dir: Path, flags: list[str], about: str) -> Stage:
    """One train.py run that resumes where it stopped and reports its trainer figures."""
    cmd = _launcher(cfg) + ["train.py", f"--stage={stage}", f"--tokenizer_dir={Path(cfg.root) / 'tokenizer'}",
                            f"--output_dir={out_dir}"] + flags
    return Stage(name, [cmd], [str(out_dir / "model.safetensors")], about, resume_args=["--is_keep_training=True"],
                 after=lambda: trainer_figures(out_dir), out_dir=str(out_dir))


def _training_stages(cfg: PipelineConfig) -> list[Stage]:
    """The copy warm-up (when asked), pretraining and SFT."""
    root = Path(cfg.root)
    data_dir, pre_dir, sft_dir = root / "data", root / "pretrain", root / "sft"
    train_files = f"{data_dir / 'my_text_dataset.parquet'}:1,{data_dir / 'my_train_dataset.parquet'}:1"
    seed = {} if cfg.seed is None else {"seed": cfg.seed}
    pre_flags = dict(dict(train_file=train_files, valid_file=data_dir / "my_valid_dataset.parquet"),
                     **cfg.pretrain, **seed)
    stages: list[Stage] = []
    if cfg.copy_warmup:  # the copy skill first, on the text rows alone; pretraining continues from it
        warm_dir = root / "copy_warmup"
        shape = {k: cfg.pretrain[k] for k in ("preset", "model_overrides", "dropout_rate", "num_threads")
                 if k in cfg.pretrain}
        warm_flags = {**shape, "train_file": data_dir / "my_text_dataset.parquet",
                      "valid_file": data_dir / "my_valid_dataset.parquet", "text_mode": "copy", **cfg.copy_warmup,
                      **seed}
        stages.append(_train_stage(cfg, "copy_warmup", cfg.pretrain_stage, warm_dir, _flags(warm_flags),
                                   "copy warm-up"))
        pre_flags["init_from"] = warm_dir
    stages.append(_train_stage(cfg, "pretrain", cfg.pretrain_stage, pre_dir, _flags(pre_flags), "T5 pretraining"))
    sft_flags = dict(dict(valid_file=data_dir / "my_valid_dataset.parquet"), **cfg.sft, **seed)
    if not cfg.demo_data:
        sft_flags.setdefault("train_file", data_dir / "my_train_dataset.parquet")
    sft_init = ([f"--init_from={pre_dir}"] if cfg.sft_from_pretrain
                else ["--is_finetune=False", "--init_from=None", f"--preset={_preset(cfg)}"])
    stages.append(_train_stage(cfg, "sft", cfg.sft_stage, sft_dir, sft_init + _flags(sft_flags),
                               "instruction fine-tuning"))
    return stages


def _dpo_stage(cfg: PipelineConfig) -> Stage:
    """Preference optimisation from the SFT model, on pairs held out by prompt when ``dpo_valid_ratio`` > 0."""
    root = Path(cfg.root)
    data_dir, tok_dir, dpo_dir = root / "data", root / "tokenizer", root / "dpo"
    seed = {} if cfg.seed is None else {"seed": cfg.seed}
    dpo_file = cfg.dpo_file or str(data_dir / "my_dpo_dataset.parquet")
    dpo_cmds, dpo_files = [], [f"--train_file={dpo_file}"]
    if cfg.dpo_valid_ratio > 0:  # hold out pairs by prompt, so the report's DPO accuracy is on unseen pairs
        split_dir = root / "dpo_data"
        lens = {k: cfg.dpo[k] for k in ("max_source_len", "max_target_len") if k in cfg.dpo}
        dpo_cmds.append(PY + ["utils/dpo_data_process.py", "build", f"--inputs={dpo_file}",
                              f"--tokenizer_dir={tok_dir}", f"--out_dir={split_dir}",
                              f"--valid_ratio={cfg.dpo_valid_ratio}"] + _flags(lens))
        dpo_files = [f"--train_file={split_dir / 'my_dpo_train.parquet'}",
                     f"--valid_file={split_dir / 'my_dpo_valid.parquet'}"]
    dpo_cmds.append(_launcher(cfg) + ["dpo_train.py", f"--sft_model_dir={root / 'sft'}"] + dpo_files
                    + [f"--output_dir={dpo_dir}"] + _flags(dict(cfg.dpo, **seed)))
    return Stage("dpo", dpo_cmds, [str(dpo_dir / "model.safetensors")], "preference optimisation",
                 resume_args=["--is_keep_training=True"], after=lambda: dpo_figures(dpo_dir), out_dir=str(dpo_dir))


def _ceval_stage(cfg: PipelineConfig) -> Stage:
    out = Path(cfg.root) / "eval" / "ceval"
    return Stage("ceval", [PY + ["eval/c_eval.py", f"--model_dir={Path(cfg.root)}", f"--data_dir={cfg.ceval_dir}",
                                 f"--split={cfg.ceval_split}", f"--out_dir={out}", "--show_table=True"]
                           + _flags(cfg.ceval)],
                 [str(out)], "C-Eval-style multiple choice", after=lambda: ceval_figures(out), out_dir=str(out))


def ie_stage(cfg: PipelineConfig) -> Stage:
    root = Path(cfg.root)
    out = root / "ie"
    runs = {"from the pretrained model": "ie"}
    ie_py = "finetune_examples/info_extract/"
    if cfg.ie_train:
        common = [ie_py + "finetune.py", f"--train_file={cfg.ie_train}", f"--dev_file={cfg.ie_dev}"]
        cmds = [PY + common + [f"--init_from={root / 'pretrain'}", f"--output_dir={out}",
                               f"--data_dir={root / 'ie_data'}"] + _flags(cfg.ie)]
        if cfg.ie_scratch:  # the same budget from random init: what pretraining is worth, measured
            shape = {k: cfg.pretrain[k] for k in ("model_overrides", "dropout_rate") if k in cfg.pretrain}
            cmds.append(PY + common + [f"--tokenizer_dir={root / 'tokenizer'}", f"--preset={_preset(cfg)}",
                                       f"--output_dir={root / 'ie_scratch'}",
                                       f"--data_dir={root / ('ie_scratch_data' if cfg.ie_parallel else 'ie_data')}"]
                        + _flags(dict(shape, **cfg.ie)))
            runs["from random init, same budget"] = "ie_scratch"
    else:
        cmds = [PY + [ie_py + "finetune.py", "demo", f"--model_dir={root}", f"--output_dir={out}"]]
    return Stage("ie", cmds, [str(out)], "triple extraction", after=lambda: ie_figures(root, runs), out_dir=str(out),
                 parallel=cfg.ie_parallel)


def export_final(cfg: PipelineConfig) -> dict:
    """Copy the last stage's model files into the profile's root, which is the kit's final model folder."""
    root = Path(cfg.root)
    src = root / ("dpo" if cfg.use_dpo_model else "sft")
    for f in src.iterdir():
        if f.is_file() and f.name != SUMMARY:
            shutil.copy2(f, root / f.name)
    from model.hub import push_folder, write_model_card
    write_model_card(root, extra={"pipeline_profile": cfg.profile, "from_stage": src.name})
    console.print(f"final model: {root} (from {src})")
    out = {"source": str(src)}
    valid = root / "data" / "my_valid_dataset.parquet"
    if cfg.decoding_prompts > 0 and valid.is_file():
        from eval.decoding import choose
        out["decoding"] = choose(model_dir=str(root), prompts=str(valid), n=cfg.decoding_prompts, write=True)
    if cfg.push_to_hub:
        out["pushed_to"] = push_folder(root, cfg.push_to_hub)
    return out


def sample_chats(cfg: PipelineConfig) -> dict:
    from model.serving.infer import ChatBot  # torch and transformers load here, not for --help or the other stages
    bot = ChatBot(make_config(InferConfig, model_dir=str(cfg.root), max_new_tokens=64))  # folder's decoding
    result = {"heldout": [], "samples": []}
    if cfg.heldout and Path(cfg.heldout).is_file():
        held = json.loads(Path(cfg.heldout).read_text(encoding="utf-8"))
        answers = bot.chat([h["prompt"] for h in held])
        console.rule("held-out questions (never seen in training)")
        for h, a in zip(held, answers):
            text = a if isinstance(a, str) else getattr(a, "text", str(a))
            ok = h["expect"] in text
            result["heldout"].append({"prompt": h["prompt"], "answer": text, "expected": h["expect"], "correct": ok})
            console.print(f"Q: {h['prompt']}\nA: {text}   [{'green' if ok else 'red'}]"
                          f"{'correct' if ok else 'wrong'} (expected: {h['expect']})[/]")
        n_ok = sum(r["correct"] for r in result["heldout"])
        console.print(f"[bold]{n_ok} of {len(held)} held-out questions answered correctly[/]")
    if cfg.passage_file and cfg.passage_questions > 0:
        result["passage"] = passage_chats(bot, cfg)
    console.rule("sample chats")
    answers = bot.chat(list(cfg.sample_prompts))
    all_ids = []
    for q, a in zip(cfg.sample_prompts, answers):
        text = a if isinstance(a, str) else getattr(a, "text", str(a))
        ids = bot.tokenizer(text, add_special_tokens=False)["input_ids"]
        all_ids.append(ids)
        result["samples"].append({"prompt": q, "answer": text, "top_token_share": round(top_token_share(ids), 3),
                                  "degenerate": is_degenerate(ids)})
        console.print(f"Q: {q}\nA: {text}")
    result["degenerate"] = sum(s["degenerate"] for s in result["samples"])
    result["distinct_2"] = round(distinct_n(all_ids, 2), 4)
    result["generation"] = ", ".join(f"{k} {bot.cfg.__dict__[k]}" for k in
                                     ("max_new_tokens", "repetition_penalty", "no_repeat_ngram_size"))
    console.print(f"degenerate answers: {result['degenerate']} of {len(all_ids)}, distinct-2 {result['distinct_2']}")
    try:
        from model.serving.server import sample_exchange
        console.rule("sample API exchange")
        exchange = sample_exchange(str(cfg.root))
        console.print(exchange, markup=False)
        result["api_exchange"] = exchange
    except ImportError as exc:  # the API module is optional for the report
        result["api_exchange"] = f"unavailable: {exc}"
    return result


def passage_chats(bot, cfg: PipelineConfig) -> dict:
    """Questions whose answer is a span of the passage in the prompt: how many answers contain a gold span."""
    from eval.passage_qa import contains_gold, passage_questions
    qs = passage_questions(cfg.passage_file, cfg.passage_questions)
    answers = bot.chat([q["prompt"] for q in qs])
    console.rule("questions about a given passage")
    for q, a in zip(qs, answers):
        q["answer"] = a if isinstance(a, str) else getattr(a, "text", str(a))
        q["contains_gold"] = contains_gold(q["answer"], q["answers"])
        console.print(f"Q: {q['prompt']}\nA: {q['answer']}   (gold: {' / '.join(q['answers'])})", markup=False)
    n_ok = sum(q["contains_gold"] for q in qs)
    console.print(f"[bold]{n_ok} of {len(qs)} passage answers contain a gold span[/]")
    return {"n": len(qs), "contains_gold": n_ok, "questions": qs}


def report_card(cfg: PipelineConfig) -> dict:
    path = write_report_card(cfg)
    console.print(f"report card: {path}")
    return {"report": str(path)}


def main(profile: str = "demo", force: str | tuple = (), only: str | tuple = (), **overrides):
    cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES, **overrides)
    if cfg.dry_run:
        cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES,
                          **{**overrides, **dry_run_profile(cfg, cfg.dry_run)})
    if cfg.python != "python" and not cfg.dry_run:
        import torch
        if torch.cuda.device_count() == 0:
            raise SystemExit(f"profile {cfg.profile!r} launches `{cfg.python}` on GPUs but this machine has none; "
                             f"test the profile on a CPU with --dry_run=True")
    as_tuple = lambda v: tuple(v.split(",")) if isinstance(v, str) else tuple(v or ())  # noqa: E731
    stages = build_stages(cfg)
    names = [s.name for s in stages]
    for n in as_tuple(force) + as_tuple(only):
        if n not in names:
            raise SystemExit(f"unknown stage {n!r}; stages: {', '.join(names)}")
    Path(cfg.root).mkdir(parents=True, exist_ok=True)
    (Path(cfg.root) / "pipeline_config.json").write_text(
        json.dumps(cfg.__dict__, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    results = run_stages(stages, Path(cfg.root) / "stages", force=as_tuple(force), only=as_tuple(only), env=_env(cfg))
    print_stage_table(results)


if __name__ == "__main__":
    run_cli(main)
