"""The README as a new user reads it: every Python snippet runs as printed (against a tiny model folder put where
it expects one, and a local server where it calls the API), and every flag of its commands exists."""
from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import shutil
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
API_URL = "http://127.0.0.1:8812"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """Each command of the bash blocks as words, continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def script_flags() -> dict[str, set[str]]:
    """The flags each script accepts: its config's fields and the names its entry point takes."""
    import finetune_examples.info_extract.finetune as ie
    import utils.dpo_data_process as dpo_data
    import utils.raw_data_process as data
    return {
        "train.py": _fields(config.TrainConfig) | {"stage"},
        "dpo_train.py": _fields(config.DPOConfig),
        "train_tokenizer.py": _fields(config.TokenizerTrainConfig) | {"preset"},
        "eval/c_eval.py": _fields(config.CEvalConfig),
        "cli_demo.py": _fields(config.InferConfig),
        "api_demo.py": _fields(config.InferConfig),
        "pipeline.py": _fields(config.PipelineConfig) | {"force", "only"},
        "utils/raw_data_process.py": _params(data.main),
        "utils/dpo_data_process.py": _params(dpo_data.build),
        "finetune_examples/info_extract/finetune.py": _params(ie.finetune) | _fields(config.TrainConfig),
    }


def test_every_flag_of_the_readme_commands_exists():
    known = script_flags()
    checked = 0
    for words in commands():
        script = next((w for w in words if w.endswith(".py")), None)
        if script not in known:
            continue
        flags = {w[2:].split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")}
        assert flags <= known[script], f"{' '.join(words)}: unknown flags {sorted(flags - known[script])}"
        checked += 1
    assert checked >= 8


@pytest.fixture()
def demo_folder(tmp_path, toy_model_dir, monkeypatch):
    """The README's working directory with the tiny model where the snippets expect the demo's."""
    shutil.copytree(toy_model_dir, tmp_path / "model_save" / "demo")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "model_save" / "demo"


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_snippet_runs_as_printed(i, demo_folder, capsys):
    code = blocks("python")[i]
    if API_URL not in code:
        exec(compile(code, f"README.md python block {i}", "exec"), {})
    else:  # the server a user starts with api_demo.py, on a free port
        from model.serving.infer import ChatBot
        from model.serving.server import ServerThread, create_app
        bot = ChatBot(model_dir=str(demo_folder), max_new_tokens=16)
        with ServerThread(create_app(bot)) as srv:
            exec(compile(code.replace(API_URL, srv.url), f"README.md python block {i}", "exec"), {})
    assert capsys.readouterr().out.strip()
