"""cli_demo.py: piped terminal session end to end, and a clear message for a missing model folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_demo import chat_loop
from model.serving.infer import ChatBot

ROOT = Path(__file__).resolve().parents[1]


def test_cli_session(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=32)
    a1 = bot.chat("你好")
    a2 = bot.chat("3加5等于多少？", history=[("你好", a1)])
    a3 = bot.chat("你是谁？")  # after cls: no history
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "cli_demo.py", f"--model_dir={toy_model_dir}", "--max_new_tokens=32",
                        "--torch_threads=1"], cwd=ROOT, input="你好\n3加5等于多少？\ncls\n你是谁？\nexit\n不会读到\n",
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"ChatBot: {a1}" in out and f"ChatBot: {a2}" in out and f"ChatBot: {a3}" in out
    assert "history cleared" in out and out.rstrip().endswith("bye")
    assert "不会读到" not in out


def test_cli_search_type_choice(toy_model_dir, capsys, monkeypatch):
    import cli_demo
    lines = iter(["你好", "exit"])
    monkeypatch.setattr("builtins.input", lambda *_a: next(lines))
    cli_demo.main(model_dir=str(toy_model_dir), search_type="beam", max_new_tokens=16)
    out = capsys.readouterr().out
    assert "beam" in out
    assert ChatBot(model_dir=str(toy_model_dir), search_type="beam", max_new_tokens=16).chat("你好") in out


def test_cli_missing_model_folder(tmp_path, capsys):
    import cli_demo
    with pytest.raises(SystemExit) as e:
        cli_demo.main(model_dir=str(tmp_path / "no_model"))
    out = capsys.readouterr().out
    assert e.value.code == 1 and "does not exist" in out and "no_model" in out


def test_cli_bad_option(capsys):
    import cli_demo
    with pytest.raises(SystemExit):
        cli_demo.main(search_typ="beam")
    assert "unknown option" in capsys.readouterr().out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_every_field_with_type_default_and_meaning():
    import dataclasses
    from config import DPOConfig, InferConfig, PipelineConfig, TrainConfig
    from config import TokenizerTrainConfig
    for script, cls in (("train.py", TrainConfig), ("dpo_train.py", DPOConfig), ("api_demo.py", InferConfig),
                        ("cli_demo.py", InferConfig), ("pipeline.py", PipelineConfig),
                        ("train_tokenizer.py", TokenizerTrainConfig)):
        p = _run(script, "--help")
        assert p.returncode == 0, p.stderr[-2000:]
        for f in dataclasses.fields(cls):
            assert f"--{f.name} " in p.stdout, (script, f.name)
        assert "Traceback" not in p.stderr
    line = next(x for x in _run("train.py", "--help").stdout.splitlines() if x.strip().startswith("--save_steps "))
    assert "int" in line and "1000" in line and "0: off" in line


def test_one_subcommand_style_main_action_by_flags_others_by_name():
    """Flags run a script's main action; a first word names another action; `train.py train` still works."""
    assert "--save_steps " in _run("train.py", "train", "--help").stdout  # with the command word
    dpo = _run("dpo_train.py", "--help").stdout
    assert "dpo_train.py merge" in dpo and "--beta " in dpo  # the other action is named in the help
    merge = _run("dpo_train.py", "merge", "--help")
    assert merge.returncode == 0 and "adapter_dir" in (merge.stdout + merge.stderr).lower()  # fire: on stderr
    ie = _run("finetune_examples/info_extract/finetune.py", "--help")  # help only: no data processed, no training
    assert ie.returncode == 0 and "finetune.py demo" in ie.stdout and "--time_budget_min" in ie.stdout
    assert "--save_steps " in ie.stdout and "ie_data" not in ie.stdout + ie.stderr
    bad = _run("train.py", "--save_stepz=0")
    assert bad.returncode == 2 and "error: unknown option(s) for TrainConfig: save_stepz" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = _run("api_demo.py", "--port=http")
    assert bad.returncode == 2 and "InferConfig.port expects int" in bad.stderr and "Traceback" not in bad.stderr


def test_flag_values_are_checked_against_the_field_types(tmp_path):
    from config import InferConfig, TrainConfig, make_config
    assert make_config(InferConfig, api_key=123456).api_key == "123456"  # fire parsed it as an int
    assert make_config(InferConfig, api_key=None).api_key is None
    with pytest.raises(ValueError, match="InferConfig.api_key expects str"):
        make_config(InferConfig, api_key=True)
    assert make_config(TrainConfig, learning_rate=1).learning_rate == 1.0
    with pytest.raises(ValueError, match="TrainConfig.save_steps expects int, got 'often'"):
        make_config(TrainConfig, save_steps="often")
    with pytest.raises(ValueError, match="TrainConfig.cpu expects bool"):
        make_config(TrainConfig, cpu=3)
    run = tmp_path / "run.yaml"
    run.write_text("learning_rate: 0.002\nmax_steps: 50\n", encoding="utf-8")
    cfg = make_config(TrainConfig, config=str(run), max_steps=7)  # the flag wins over the file
    assert (cfg.learning_rate, cfg.max_steps) == (0.002, 7)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        make_config(TrainConfig, config=str(tmp_path / "nope.yaml"))


def test_chat_loop_multi_turn_exit_and_cls(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=32)
    from rich.console import Console
    seen = []

    class Spy:
        cfg, engine, model_name = bot.cfg, "torch", "spy"

        def stream_chat(self, q, history):
            seen.append((q, list(history)))
            yield from bot.stream_chat(q, history)

    console = Console(record=True, width=200)
    n = chat_loop(Spy(), console, lines=["你好", "3加5等于多少？", "cls", "你是谁？", "exit", "never read"])
    out = console.export_text()
    assert n == 3
    a1 = bot.chat("你好")
    assert seen[0] == ("你好", [])
    assert seen[1] == ("3加5等于多少？", [("你好", a1)])  # multi-turn: the first answer is in the history
    assert seen[2] == ("你是谁？", [])  # cls cleared the history
    assert "ChatBot: " + a1 in out and "history cleared" in out and "bye" in out
    assert "never read" not in out
