"""Runs the kit's stages one after another as the commands a user would type, and remembers what finished.

Each stage is a list of shell commands with declared outputs. A stage is skipped when its completion marker
exists and its outputs are all present (it says so); a stage that was stopped is started again with its resume
arguments (the trainers continue from their last checkpoint). Wall time and peak RSS of every command come from
``os.wait4`` on the child, so each stage's memory is its own, not the pipeline's.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

console = Console()


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    outputs: list[str]
    description: str = ""
    # extra arguments appended to the LAST command when a previous attempt left partial work behind
    resume_args: list[str] = field(default_factory=list)
    # a Python callable run after the commands (e.g. printing answers); its return value is stored
    after: Optional[Callable[[], dict]] = None


def _marker(state_dir: Path, stage: Stage) -> Path:
    return state_dir / f"{stage.name}.json"


def stage_complete(state_dir: Path, stage: Stage) -> bool:
    return _marker(state_dir, stage).is_file() and all(Path(o).exists() for o in stage.outputs)


def run_command(cmd: list[str], log_file: Path, env: Optional[dict] = None) -> dict:
    """Run one command, tee its output to a log, and return wall time, peak RSS and exit status."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": shlex.join(cmd), "returncode": proc.returncode, "wall_s": round(time.time() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run_stages(stages: list[Stage], state_dir: str | Path, force: tuple[str, ...] = (),
               only: tuple[str, ...] = (), env: Optional[dict] = None) -> dict:
    """Run the stages in order; returns {stage: marker dict}. Raises on the first failing command."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    results = {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        marker = _marker(state, stage)
        if stage.name not in force and stage_complete(state, stage):
            console.print(f"[bold green]✓ {stage.name}[/]: already complete ({marker}), skipped")
            results[stage.name] = json.loads(marker.read_text())
            continue
        started = state / f"{stage.name}.started"
        resuming = started.exists() and stage.name not in force
        console.rule(f"[bold]{stage.name}[/] {stage.description}" + (" (resuming)" if resuming else ""))
        started.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        runs = []
        for i, cmd in enumerate(stage.commands):
            if resuming and i == len(stage.commands) - 1:
                cmd = cmd + stage.resume_args
            console.print(f"[cyan]$ {shlex.join(cmd)}[/]")
            r = run_command(cmd, state / f"{stage.name}.log", env=env)
            runs.append(r)
            if r["returncode"] != 0:
                raise RuntimeError(f"stage {stage.name!r} failed (exit {r['returncode']}) running: {r['cmd']}\n"
                                   f"see {state / (stage.name + '.log')}; run the pipeline again to resume")
        t_after = time.time()
        extra = stage.after() if stage.after else None
        t_after = time.time() - t_after
        missing = [o for o in stage.outputs if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} finished but did not write {', '.join(missing)}")
        info = {"stage": stage.name, "commands": runs,
                "wall_s": round(sum(r["wall_s"] for r in runs) + t_after, 2),
                # in-process steps share the pipeline's own memory: no separate figure for them
                "peak_rss_mb": max([r["peak_rss_mb"] for r in runs], default=None),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": extra}
        marker.write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
        started.unlink(missing_ok=True)
        results[stage.name] = info
        rss = f", peak RSS {info['peak_rss_mb']:.0f} MB" if info["peak_rss_mb"] is not None else ""
        console.print(f"[green]{stage.name} done in {info['wall_s']:.1f} s{rss}[/]")
    return results
