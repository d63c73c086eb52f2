"""Two real CPU processes (gloo DDP through torchrun): each rank trains on different samples, weights stay equal."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from instrumented import script_command, script_env

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_shard_data_and_keep_equal_weights(tiny_tokenizer, demo_data, tmp_path):
    from model.tokenizer.build import save_tokenizer
    tok_dir = save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail(f"{torchrun} not found: install the requirements into the venv")
    kw = dict(preset="tiny", tokenizer_dir=tok_dir, output_dir=out, train_file=f"{demo_data['sft']}:0.2",
              valid_file=demo_data["sft_valid"], batch_size_per_gpu=4, max_source_len=32, max_target_len=32,
              max_steps=8, save_steps=4, eval_steps=4, logging_steps=4, max_eval_samples=12, bleu_samples=4,
              num_threads=1, log_with="none", show_progress=False, dropout_rate=0.1)
    env = script_env(dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"))
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs: pick a free port ourselves
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port)] + \
        script_command(["train.py", "train"] + [f"--{k}={v}" for k, v in kw.items()], dump_samples=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                       start_new_session=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    finals = [json.loads((out / "debug" / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert finals[0]["param_checksum"] == finals[1]["param_checksum"]  # DDP kept the replicas equal
    keys = []
    for r in (0, 1):
        rows = [json.loads(x) for x in (out / "debug" / f"samples_rank{r}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == list(range(1, 9))
        keys.append([tuple(k) for x in rows for k in x["keys"]])
    assert len(keys[0]) == len(keys[1]) == 32
    # the sft file at weight 0.2 gives fewer than 64 samples per epoch: compare within each epoch
    import pandas as pd
    n = round(0.2 * len(pd.read_parquet(demo_data["sft"])))
    e = n // 2  # samples per rank per epoch
    for start in range(0, 32, e):
        a, b = set(keys[0][start:start + e]), set(keys[1][start:start + e])
        assert not a & b, "two ranks trained on the same sample in one epoch"
    ckpt = out / "checkpoints" / "step-8"
    assert (ckpt / "rank_state0.pkl").is_file() and (ckpt / "rank_state1.pkl").is_file()
    assert (out / "model.safetensors").is_file()
