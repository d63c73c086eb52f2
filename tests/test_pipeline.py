"""The pipeline runner: skips finished stages, resumes stopped ones with their resume arguments, fails loudly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from config import PIPELINE_PROFILES, PipelineConfig, make_config
from utils.pipeline_runner import Stage, run_stages


def _write(path: Path, text: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; open({str(path)!r}, 'a').write({text!r} + ' '.join(sys.argv[1:]) + '\\n')"]


def test_skips_complete_stages_and_records_figures(tmp_path):
    out = tmp_path / "a.txt"
    stages = [Stage("a", [_write(out, "ran")], [str(out)])]
    res = run_stages(stages, tmp_path / "state")
    assert res["a"]["commands"][0]["returncode"] == 0
    assert res["a"]["peak_rss_mb"] > 1
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
    marker = json.loads((tmp_path / "state" / "train.json").read_text())
    assert marker["stage"] == "train" and not (tmp_path / "state" / "train.started").exists()


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
