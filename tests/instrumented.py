"""Instruments for the training loop that live with the tests, not in product code: a signal sent to the
process after a given update (the SIGTERM and kill -9 resume tests) and, per rank, the sample keys of every
update and the final figures (the two-process test).

In a test: ``with instrumented(signal_at="6:SIGTERM"): train(cfg)``. Around a script, under torchrun too:
``script_command(["train.py", "train", "--flag=..."], signal_at="12:SIGKILL")`` run with ``script_env()``.
"""
from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Optional

from model.training.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def instrumented(signal_at: Optional[str] = None, dump_samples: bool = False):
    """Patch the loop while inside: ``signal_at`` "STEP:SIGNAME" signals this process after update STEP;
    ``dump_samples`` writes ``debug/samples_rank{r}.jsonl`` and ``debug/final_rank{r}.json`` in the output."""
    train_step, fit = Trainer.train_step, Trainer.fit

    def step_then_act(self: Trainer) -> list:
        micro = train_step(self)
        step = self.state["step"]
        if dump_samples:  # a fresh file for a run from step 0, appended to by a resumed run
            with open(_debug_dir(self) / f"samples_rank{self.rank}.jsonl", "w" if step == 1 else "a") as f:
                f.write(json.dumps({"step": step, "keys": [k for b in micro for k in b.keys]}) + "\n")
        if signal_at and int(signal_at.split(":")[0]) == step:
            os.kill(os.getpid(), getattr(signal, signal_at.split(":")[1]))
        return micro

    def fit_and_record(self: Trainer) -> dict:
        result = fit(self)
        if dump_samples:
            (_debug_dir(self) / f"final_rank{self.rank}.json").write_text(json.dumps(result, default=str))
        return result

    Trainer.train_step, Trainer.fit = step_then_act, fit_and_record
    try:
        yield
    finally:
        Trainer.train_step, Trainer.fit = train_step, fit


def script_command(script_args: list[str], signal_at: Optional[str] = None, dump_samples: bool = False) -> list[str]:
    """The arguments after ``python`` (or ``torchrun ...``) that run a script under :func:`instrumented`."""
    opts = ([f"--signal_at={signal_at}"] if signal_at else []) + (["--dump_samples"] if dump_samples else [])
    return [str(Path(__file__))] + opts + script_args


def script_env(env: Optional[dict] = None) -> dict:
    """The environment for :func:`script_command`: the project root importable, as when a script runs itself."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _debug_dir(trainer: Trainer) -> Path:
    d = trainer.out / "debug"
    d.mkdir(parents=True, exist_ok=True)
    return d


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {"signal_at": None, "dump_samples": False}
    while args and args[0].startswith("--"):
        name, _, value = args.pop(0)[2:].partition("=")
        opts[name] = value or True
    sys.argv = args
    with instrumented(**opts):
        runpy.run_path(args[0], run_name="__main__")
