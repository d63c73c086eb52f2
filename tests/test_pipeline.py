"""The pipeline's stage runner: skips finished stages, resumes stopped ones with their resume arguments, fails
loudly, and writes each stage's summary.json next to its output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from config import PIPELINE_PROFILES, PipelineConfig, make_config
from pipeline import Stage, run_stages

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; open({str(path)!r}, 'a').write({text!r} + ' '.join(sys.argv[1:]) + '\\n')"]


def test_skips_complete_stages_and_records_figures(tmp_path):
    out = tmp_path / "a.txt"
    stages = [Stage("a", [_write(out, "ran")], [str(out)], after=lambda: {"lines": 1}, out_dir=str(tmp_path / "a"))]
    res = run_stages(stages, tmp_path / "state")
    assert res["a"]["commands"][0]["returncode"] == 0
    assert res["a"]["peak_rss_mb"] > 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())  # next to the stage's output
    assert summary["stage"] == "a" and summary["figures"] == {"lines": 1} and summary["wall_s"] > 0
    run_stages(stages, tmp_path / "state")  # complete: skipped, nothing appended
    assert out.read_text().count("ran") == 1
    run_stages(stages, tmp_path / "state", force=("a",))
    assert out.read_text().count("ran") == 2


def test_missing_output_is_not_complete(tmp_path):
    out = tmp_path / "b.txt"
    stages = [Stage("b", [_write(out, "ran")], [str(out)])]
    run_stages(stages, tmp_path / "state")
    out.unlink()
    run_stages(stages, tmp_path / "state")
    assert out.read_text().count("ran") == 1


def test_failed_stage_raises_and_resumes_with_resume_args(tmp_path):
    flag = tmp_path / "fail_once"
    flag.write_text("x")
    log = tmp_path / "log.txt"
    failing = [sys.executable, "-c",
               f"import os, sys; p={str(flag)!r}\n"
               f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
               "if os.path.exists(p):\n    os.remove(p); sys.exit(3)"]
    stages = [Stage("train", [failing], [str(log)], resume_args=["--is_keep_training=True"])]
    with pytest.raises(RuntimeError, match="stage 'train' failed \\(exit 3\\)"):
        run_stages(stages, tmp_path / "state")
    run_stages(stages, tmp_path / "state")
    lines = log.read_text().splitlines()
    assert lines == ["", "--is_keep_training=True"]
    summary = json.loads((tmp_path / "state" / "train" / "summary.json").read_text())  # no out_dir: the state dir
    assert summary["stage"] == "train" and not (tmp_path / "state" / "train.started").exists()


def _meet(mine: Path, other: Path, fail: bool = False) -> list[str]:
    """A command that leaves ``mine`` and waits (20 s at most) for ``other``: two of them end only side by side."""
    return [sys.executable, "-c",
            f"import os, sys, time; open({str(mine)!r}, 'w').write('here')\n"
            f"end = time.time() + 20\n"
            f"while not os.path.exists({str(other)!r}) and time.time() < end: time.sleep(0.05)\n"
            f"print('met' if os.path.exists({str(other)!r}) else 'alone'); sys.exit({3 if fail else 0})"]


def test_parallel_stage_runs_its_commands_side_by_side_each_with_its_own_log(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    state = tmp_path / "state"
    run_stages([Stage("pair", [_meet(a, b), _meet(b, a)], [str(a), str(b)], parallel=True)], state)
    # one after the other, the first would wait out its 20 s and print "alone"
    assert [(state / f"pair.{i}.log").read_text().split()[-1] for i in (0, 1)] == ["met", "met"]
    summary = json.loads((state / "pair" / "summary.json").read_text())
    assert summary["wall_s"] < 20 and len(summary["commands"]) == 2
    assert summary["peak_rss_mb"] == pytest.approx(sum(r["peak_rss_mb"] for r in summary["commands"]))
    a.unlink(), b.unlink()
    with pytest.raises(RuntimeError, match=r"(?s)stage 'pair' failed \(exit 3\).*pair\.1\.log"):
        run_stages([Stage("pair", [_meet(a, b), _meet(b, a, fail=True)], [str(a)], parallel=True)], state,
                   force=("pair",))
    assert (state / "pair.0.log").read_text().split()[-1] == "met"  # the other command ran to its end


def test_profiles_are_valid_configs():
    for name in ("demo", "cpu", "gpu"):
        cfg = make_config(PipelineConfig, name, PIPELINE_PROFILES)
        assert cfg.profile == name
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(PipelineConfig, "huge", PIPELINE_PROFILES)


def test_pipeline_stage_list_and_unknown_stage(tmp_path):
    import pipeline
    cfg = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(tmp_path / "root"))
    names = [s.name for s in pipeline.build_stages(cfg)]
    assert names == ["demo_data", "data", "tokenizer", "pretrain", "sft", "dpo", "final", "ceval", "ie", "chat",
                     "report"]
    with pytest.raises(SystemExit, match="unknown stage 'nope'"):
        pipeline.main(profile="demo", only="nope", root=str(tmp_path / "root"))


def test_cpu_profile_pretrains_from_its_copy_warmup(tmp_path):
    import pipeline
    root = tmp_path / "root"
    cfg = make_config(PipelineConfig, "cpu", PIPELINE_PROFILES, root=str(root))
    stages = {s.name: s for s in pipeline.build_stages(cfg)}
    names = list(stages)
    assert names.index("tokenizer") < names.index("copy_warmup") < names.index("pretrain")
    warm = " ".join(stages["copy_warmup"].commands[0])
    assert "--text_mode=copy" in warm and f"--output_dir={root / 'copy_warmup'}" in warm
    assert "my_text_dataset.parquet " in warm + " " and "my_train_dataset" not in warm  # prose only
    assert f"--init_from={root / 'copy_warmup'}" in " ".join(stages["pretrain"].commands[0])
    demo = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(tmp_path / "demo"))
    assert "copy_warmup" not in [s.name for s in pipeline.build_stages(demo)]


def _flag_names(cmd: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in cmd if a.startswith("--")}


@pytest.mark.parametrize("profile,dry_run", [("demo", False), ("cpu", False), ("gpu", False), ("gpu", True),
                                             ("gpu", "shapes")])
def test_every_stage_flag_is_an_option_of_its_script(profile, dry_run, tmp_path):
    """A typo in a profile (a flag no script knows) would only surface an hour into a run; catch it here."""
    import dataclasses
    import inspect

    import pipeline
    from config import DPOConfig, TrainConfig
    from finetune_examples.info_extract.finetune import demo, finetune
    from utils.dpo_data_process import build

    train_opts = {f.name for f in dataclasses.fields(TrainConfig)} | {"stage"}
    known = {
        "train.py": train_opts,
        "dpo_train.py": {f.name for f in dataclasses.fields(DPOConfig)},
        "utils/dpo_data_process.py": set(inspect.signature(build).parameters),
        "finetune_examples/info_extract/finetune.py": set(inspect.signature(finetune).parameters) | train_opts,
    }
    cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES, root=str(tmp_path / "root"))
    if dry_run:
        from config import dry_run_profile
        cfg = make_config(PipelineConfig, profile, PIPELINE_PROFILES, **dry_run_profile(cfg, dry_run))
    checked = set()
    for stage in pipeline.build_stages(cfg):
        for cmd in stage.commands:
            script = next((a for a in cmd if a in known), None)
            if script is None:
                continue
            opts = known[script]
            if script.endswith("finetune.py") and "demo" in cmd:  # the `demo` subcommand
                opts = set(inspect.signature(demo).parameters)
            unknown = _flag_names(cmd[cmd.index(script):]) - opts  # launcher flags come before the script
            assert not unknown, f"{profile}/{stage.name}: {script} has no option(s) {sorted(unknown)}"
            checked.add(script)
    assert {"train.py", "dpo_train.py"} <= checked


def test_shapes_dry_run_keeps_the_gpu_profiles_model_vocabulary_and_lengths_for_two_updates_at_batch_two(tmp_path):
    """`--dry_run=shapes` exists so the first GPU run meets no shape surprise: it may shrink steps, batch and data,
    never the model, the vocabulary or a stage's sequence lengths."""
    import pipeline
    from config import ConfigError, dry_run_profile
    gpu = make_config(PipelineConfig, "gpu", PIPELINE_PROFILES, root=str(tmp_path / "gpu"))
    dry = make_config(PipelineConfig, "gpu", PIPELINE_PROFILES, **dry_run_profile(gpu, "shapes"))
    assert dry.root == str(tmp_path / "gpu") + "_dry_run_shapes" and dry.python == "python"
    assert dry.tokenizer["vocab_size"] == gpu.tokenizer["vocab_size"] == 29298
    shape = ("preset", "model_overrides", "max_source_len", "max_target_len", "dropout_rate")
    for stage in ("pretrain", "sft", "dpo", "ie"):
        real, shrunk = getattr(gpu, stage), getattr(dry, stage)
        assert {k: real.get(k) for k in shape} == {k: shrunk.get(k) for k in shape}, stage
        assert shrunk["max_steps"] == 2 and shrunk["batch_size_per_gpu"] <= 2 and shrunk["cpu"] is True, stage
    pre = next(s for s in pipeline.build_stages(dry) if s.name == "pretrain").commands[0]
    assert pre[0] == sys.executable and "--preset=base" in pre and "--max_source_len=256" in pre
    with pytest.raises(ConfigError):
        dry_run_profile(gpu, "shape")


def test_held_out_dpo_pairs_are_split_off_when_asked(tmp_path):
    import pipeline
    cfg = make_config(PipelineConfig, "cpu", PIPELINE_PROFILES, root=str(tmp_path / "root"))
    dpo = next(s for s in pipeline.build_stages(cfg) if s.name == "dpo")
    assert len(dpo.commands) == 2 and "build" in dpo.commands[0]
    train_cmd = " ".join(dpo.commands[1])
    assert "--valid_file=" in train_cmd and "my_dpo_valid.parquet" in train_cmd
    demo = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(tmp_path / "demo"))
    assert len(next(s for s in pipeline.build_stages(demo) if s.name == "dpo").commands) == 1


def test_every_stage_but_the_first_and_the_last_writes_its_summary_next_to_its_output(tmp_path):
    import pipeline
    root = tmp_path / "root"
    cfg = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(root))
    dirs = {s.name: s.out_dir for s in pipeline.build_stages(cfg)}
    assert dirs["demo_data"] is None and dirs["report"] is None  # their summaries go to <root>/stages/<name>/
    assert dirs["pretrain"] == str(root / "pretrain") and dirs["ceval"] == str(root / "eval" / "ceval")
    assert dirs["final"] == str(root) and dirs["chat"] == str(root / "chat")


def test_stage_figures_are_read_from_the_stage_outputs(tmp_path):
    import pipeline
    out = tmp_path / "sft"
    out.mkdir()
    rows = [{"step": 0, "baseline_unigram_bpc": 9.0, "baseline_bigram_bpc": 7.0}, {"step": 10, "loss": 4.0},
            {"step": 10, "eval_loss": 3.5, "eval_bpc": 8.0}, {"step": 20, "loss": 3.0}]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    f = pipeline.trainer_figures(out)
    assert f == {"steps": 20, "loss": 3.0, "eval_loss": 3.5, "eval_bpc": 8.0, "baseline_unigram_bpc": 9.0,
                 "baseline_bigram_bpc": 7.0, "files": {"metrics": "metrics.jsonl"}}
    # with held-out copy figures: the last ones, and the onset at the first evaluation below 1 nat
    rows += [{"step": 20, "eval_loss": 3.0, "eval_bpc": 7.5, "eval_copy_loss": 2.0, "eval_copy_rate": 0.0},
             {"step": 30, "eval_loss": 2.9, "eval_bpc": 7.4, "eval_copy_loss": 0.8, "eval_copy_rate": 0.3},
             {"step": 40, "eval_loss": 2.8, "eval_bpc": 7.3, "eval_copy_loss": 0.2, "eval_copy_rate": 0.7}]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    f = pipeline.trainer_figures(out)
    assert (f["eval_copy_loss"], f["eval_copy_rate"], f["copy_onset_eval_step"]) == (0.2, 0.7, 30)
    (tmp_path / "ie").mkdir()
    (tmp_path / "ie" / "ie_scores.json").write_text(json.dumps({"dev": {"f1": 0.5}, "train": {"steps": 7},
                                                                "train_minutes": 1.5, "eval_minutes": 0.5,
                                                                "f1_curve": [[3, 0.1], [7, 0.5]]}))
    runs = pipeline.ie_figures(tmp_path, {"pretrained": "ie", "scratch": "ie_scratch"})["runs"]
    assert runs == {"pretrained": {"dev": {"f1": 0.5}, "steps": 7, "train_minutes": 1.5, "eval_minutes": 0.5,
                                   "f1_curve": [[3, 0.1], [7, 0.5]]}}


def test_gpu_profile_dry_run_runs_every_stage_through_accelerate_with_two_processes(tmp_path):
    """The gpu profile's stages, launcher and settings, a few steps each on a narrow model: 2 CPU processes
    (gloo) when the machine has no GPU, one per GPU otherwise."""
    import subprocess
    from helpers import require_shared_data
    require_shared_data("ie/duie")
    root = ROOT / "model_save" / "test_gpu"
    import shutil
    shutil.rmtree(str(root) + "_dry_run", ignore_errors=True)
    p = subprocess.run([sys.executable, "pipeline.py", "--profile=gpu", "--dry_run=True", f"--root={root}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    dry = Path(str(root) + "_dry_run")
    for f in ("pretrain/model.safetensors", "sft/model.safetensors", "dpo/model.safetensors", "model.safetensors",
              "eval/ceval/results.json", "ie/ie_scores.json", "ie_scratch/ie_scores.json", "report.md"):
        assert (dry / f).is_file(), f
    import torch
    procs = max(1, torch.cuda.device_count()) if torch.cuda.device_count() else 2
    pre_log = (dry / "stages" / "pretrain.log").read_text(encoding="utf-8")
    assert f"{procs} process(es)" in pre_log
    for stage in ("pretrain", "sft"):
        ckpts = sorted((dry / stage / "checkpoints").glob("step-*"))
        assert ckpts and all((c / f"rank_state{r}.pkl").is_file() for c in ckpts for r in range(procs))
    report = (dry / "report.md").read_text(encoding="utf-8")
    assert "held-out bits per character" in report
    shutil.rmtree(dry, ignore_errors=True)
