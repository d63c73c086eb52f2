"""cli_demo.py: piped terminal session end to end, and a clear message for a missing model folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from model.infer import ChatBot, fit_toy_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory, demo_data, tiny_tokenizer):
    df = pd.read_parquet(demo_data["sft"])
    return fit_toy_model(tmp_path_factory.getbasetemp() / "toy_chat", list(zip(df.prompt, df.response)),
                         tiny_tokenizer, steps=100, reuse=True)


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
