"""Launching the project's scripts as real CPU process groups (gloo) with ``accelerate launch``, as a user would on GPUs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from instrumented import script_command, script_env

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
# the repository's FSDP2 config, as shipped (bf16 there; on a CPU the run's own --mixed_precision=auto picks fp32)
FSDP = ["--config_file", "configs/accelerate_fsdp.yaml", "--num_processes", "2"]
# DDP: `--cpu --num_processes 2` would start one process; --multi_gpu with ACCELERATE_USE_CPU starts two over gloo
DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def free_port() -> int:
    """A free local port (torchrun's port 0 hangs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_args(launcher: list, script: str, flags: dict, port: int, signal_at: Optional[str] = None) -> list[str]:
    """The script runs under ``instrumented`` (tests/instrumented.py): each rank dumps its sample keys and final
    figures into ``<output_dir>/debug``, and ``signal_at`` ("STEP:SIGNAME") signals every rank after that update."""
    script_args = [script] + [f"--{k}={v}" for k, v in flags.items()]
    return [str(ACCELERATE), "launch", *launcher, "--main_process_port", str(port),
            *script_command(script_args, signal_at=signal_at, dump_samples=True)]


def cpu_env() -> dict:
    """Processes on the CPU, one thread each (two processes share the machine's cores), the project importable."""
    return script_env(dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"))


def launch(launcher: list, script: str, flags: dict, timeout: int = 240,
           signal_at: Optional[str] = None) -> subprocess.CompletedProcess:
    """``accelerate launch LAUNCHER script --k=v...`` from the repository root; waits for the whole group."""
    return subprocess.run(launch_args(launcher, script, flags, free_port(), signal_at), cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def explain(p: subprocess.CompletedProcess) -> str:
    """The end of a launch's output, for an assertion message."""
    return p.stdout[-2000:] + p.stderr[-4000:]


def launch_machines(launcher: list, script: str, flags: dict, machines: int = 2,
                    timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Several "machines" on this host, one CPU process each: one ``accelerate launch`` per machine rank with
    ``--num_machines``, ``--machine_rank`` and the main machine's address and port, as on a real cluster."""
    port = free_port()
    procs = []
    for rank in range(machines):
        node = [*launcher, "--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank",
                str(rank), "--main_process_ip", "127.0.0.1"]
        procs.append(subprocess.Popen(launch_args(node, script, flags, port), cwd=ROOT, env=cpu_env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
