"""One command from raw data to a chat model, with a report card.

    python pipeline.py --profile demo          # embedded demo data, tiny model, < 10 min on 2 cores (make demo)
    python pipeline.py --profile cpu           # all of ../shared/data, small model, ~1.5 h on 2 cores
    python pipeline.py --profile gpu           # the reference's base model and batch sizes, 1-2 GPUs
    python pipeline.py --profile demo --force sft,dpo     # redo some stages
    python pipeline.py --profile cpu --only report        # rebuild the report card only
    python pipeline.py --profile gpu --dry_run=True       # the gpu profile, a few steps per stage, on any machine

Stages run as the same commands a user would type (printed as they run). Finished stages are skipped (and say
so); a stopped run continues from the stage, and the trainers from the checkpoint, where it stopped. Any
PipelineConfig field is a flag (``--root=model_save/try2``).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from config import PIPELINE_PROFILES, PipelineConfig, dry_run_profile, make_config
from utils.pipeline_runner import Stage, console, run_stages

PY = [sys.executable]


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
    from config import TRAIN_PRESETS
    return cfg.pretrain.get("preset") or TRAIN_PRESETS.get(cfg.pretrain_stage, {}).get("preset", "small")


def final_model_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.root)


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    root = Path(cfg.root)
    data_dir = root / "data"
    tok_dir = root / "tokenizer"
    pre_dir, sft_dir, dpo_dir = root / "pretrain", root / "sft", root / "dpo"
    stages: list[Stage] = []
    if cfg.demo_data:
        stages.append(Stage("demo_data", [PY + ["-m", "utils.demo_data", "--out_dir", "data/demo"]],
                            ["data/demo/sft.parquet", "data/demo/heldout.json"], "write the embedded demo data"))
    stages.append(Stage(
        "data", [PY + ["-m", "utils.raw_data_process", f"--config={cfg.data_config}", f"--output_dir={data_dir}",
                       "--quiet=True"] + _flags(cfg.data_overrides)],
        [str(data_dir / "report.json"), str(data_dir / "my_train_dataset.parquet")],
        "raw sources -> clean, deduplicated parquet + text corpus"))
    stages.append(Stage(
        "tokenizer", [PY + ["train_tokenizer.py", f"--inputs={data_dir / 'my_corpus.txt'}",
                            f"--output_dir={tok_dir}"] + _flags(cfg.tokenizer)],
        [str(tok_dir / "tokenizer.json")], "train the tokenizer on the text corpus"))
    train_files = f"{data_dir / 'my_text_dataset.parquet'}:1,{data_dir / 'my_train_dataset.parquet'}:1"
    seed = {} if cfg.seed is None else {"seed": cfg.seed}
    pre_flags = dict(dict(train_file=train_files, valid_file=data_dir / "my_valid_dataset.parquet"),
                     **cfg.pretrain, **seed)
    stages.append(Stage(
        "pretrain", [_launcher(cfg) + ["train.py", "train", f"--stage={cfg.pretrain_stage}",
                                       f"--tokenizer_dir={tok_dir}", f"--output_dir={pre_dir}"] + _flags(pre_flags)],
        [str(pre_dir / "model.safetensors")], "T5 pretraining", resume_args=["--is_keep_training=True"]))
    sft_flags = dict(dict(valid_file=data_dir / "my_valid_dataset.parquet"), **cfg.sft, **seed)
    if not cfg.demo_data:
        sft_flags.setdefault("train_file", data_dir / "my_train_dataset.parquet")
    sft_init = ([f"--init_from={pre_dir}"] if cfg.sft_from_pretrain
                else ["--is_finetune=False", "--init_from=None", f"--preset={_preset(cfg)}"])
    stages.append(Stage(
        "sft", [_launcher(cfg) + ["train.py", "train", f"--stage={cfg.sft_stage}", f"--tokenizer_dir={tok_dir}",
                                  f"--output_dir={sft_dir}"] + sft_init + _flags(sft_flags)],
        [str(sft_dir / "model.safetensors")], "instruction fine-tuning", resume_args=["--is_keep_training=True"]))
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
    dpo_cmds.append(_launcher(cfg) + ["dpo_train.py", "train", f"--sft_model_dir={sft_dir}"] + dpo_files
                    + [f"--output_dir={dpo_dir}"] + _flags(dict(cfg.dpo, **seed)))
    stages.append(Stage(
        "dpo", dpo_cmds,
        [str(dpo_dir / "model.safetensors")], "preference optimisation", resume_args=["--is_keep_training=True"]))
    stages.append(Stage("final", [], [str(root / "model.safetensors")], "export the final model",
                        after=lambda: export_final(cfg)))
    stages.append(Stage(
        "ceval", [PY + ["eval/c_eval.py", f"--model_dir={root}", f"--data_dir={cfg.ceval_dir}",
                        f"--split={cfg.ceval_split}", f"--out_dir={root / 'eval' / 'ceval'}", "--show_table=True"]
                  + _flags(cfg.ceval)],
        [str(root / "eval" / "ceval")], "C-Eval-style multiple choice"))
    stages.append(ie_stage(cfg))
    stages.append(Stage("chat", [], [], "held-out questions, sample chats, a sample API exchange",
                        after=lambda: sample_chats(cfg)))
    stages.append(Stage("report", [], [str(root / "report.md")], "report card", after=lambda: report_card(cfg)))
    return stages


def ie_stage(cfg: PipelineConfig) -> Stage:
    root = Path(cfg.root)
    out = root / "ie"
    ie_py = "finetune_examples/info_extract/"
    if cfg.ie_train:
        common = [ie_py + "finetune.py", f"--train_file={cfg.ie_train}", f"--dev_file={cfg.ie_dev}"]
        cmds = [PY + common + [f"--init_from={root / 'pretrain'}", f"--output_dir={out}",
                               f"--data_dir={root / 'ie_data'}"] + _flags(cfg.ie)]
        if cfg.ie_scratch:  # the same budget from random init: what pretraining is worth, measured
            shape = {k: cfg.pretrain[k] for k in ("model_overrides",) if cfg.pretrain.get(k)}
            cmds.append(PY + common + [f"--tokenizer_dir={root / 'tokenizer'}", f"--preset={_preset(cfg)}",
                                       f"--output_dir={root / 'ie_scratch'}", f"--data_dir={root / 'ie_data'}"]
                        + _flags(dict(shape, **cfg.ie)))
    else:
        cmds = [PY + [ie_py + "finetune.py", "demo", f"--model_dir={root}", f"--output_dir={out}"]]
    return Stage("ie", cmds, [str(out)], "triple extraction")


def export_final(cfg: PipelineConfig) -> dict:
    """Copy the last stage's model files into the profile's root, which is the kit's final model folder."""
    root = Path(cfg.root)
    src = root / ("dpo" if cfg.use_dpo_model else "sft")
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, root / f.name)
    console.print(f"final model: {root} (from {src})")
    return {"source": str(src)}


def sample_chats(cfg: PipelineConfig) -> dict:
    from model.infer import ChatBot
    from config import InferConfig

    from model.quality import distinct_n, is_degenerate, top_token_share
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
        from utils.api_server import sample_exchange
        console.rule("sample API exchange")
        exchange = sample_exchange(str(cfg.root))
        console.print(exchange, markup=False)
        result["api_exchange"] = exchange
    except ImportError as exc:  # the API module is optional for the report
        result["api_exchange"] = f"unavailable: {exc}"
    return result


def report_card(cfg: PipelineConfig) -> dict:
    from utils.report_card import write_report_card
    path = write_report_card(cfg)
    console.print(f"report card: {path}")
    return {"report": str(path)}


def main(profile: str = "demo", force: str | tuple = (), only: str | tuple = (), **overrides):
    cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES, **overrides)
    if cfg.dry_run:
        cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES, **{**overrides, **dry_run_profile(cfg)})
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
    run_stages(stages, Path(cfg.root) / "stages", force=as_tuple(force), only=as_tuple(only), env=_env(cfg))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
