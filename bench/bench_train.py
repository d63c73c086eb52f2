"""Training throughput: train.py's trainer against transformers' Seq2SeqTrainer, same model and data, one run.

Four trainers on the same initial weights, data, batch size and step count:
  * ours       - model.training.trainer.train (train.py) with ``packing=True``: several examples per row, block-diagonal
                 attention (a batch is ``batch_size`` packed rows);
  * ours_grouped - the same trainer without packing: length-grouped batches, dynamic padding;
  * hf_ref     - Seq2SeqTrainer with the reference project's settings (Adafactor, random sampling);
  * hf_grouped - the same with ``train_sampling_strategy="group_by_length"``.
Figure: non-pad training tokens (source + target) per second of the training loop; ``ratio`` = ours / hf_ref;
``pad_share`` = padded positions / all positions of ours (``<name>_pad_share`` for each trainer).
On a CPU the seconds are the process's CPU seconds (``time.process_time``, one thread): on a shared machine
wall-clock rates swung 2x between identical runs, CPU time does not; wall-clock rates are reported beside them.
On a GPU the seconds are wall-clock. An MFU estimate divides the model FLOPs of those tokens by a matmul peak
measured in the same run. Rounds alternate the trainers and the best round of each counts.

    python bench/bench_train.py                 # small preset, CPU, ../shared/data chatlm-samples
    python bench/bench_train.py --quick
    python bench/bench_train.py --device cuda --preset base --bf16 --batch_size 1 --steps 200
    python bench/bench_train.py precision --shape cpu   # fp32 against bf16 autocast on this CPU, same run
    python bench/bench_train.py side_by_side            # two runs at once, 1 thread each, against in turn at 2

Last line: one JSON object {"bench": "train", "ratio": ..., ...}.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import fire
import torch

from config import SHARED_DATA, model_config

DEFAULT_DATA = SHARED_DATA / "sft" / "chatlm-samples" / "my_train_dataset_3k.parquet"


def measure_peak_flops(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best matmul FLOP/s on this device (the MFU denominator), measured now: wall-clock on a GPU, process CPU
    time on a CPU (the same clock as the CPU throughput figures)."""
    n = 4096 if device == "cuda" else 1024
    clock = time.perf_counter if device == "cuda" else time.process_time
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = clock()
        for _ in range(10 if device == "cuda" else 2):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        dt = clock() - t
        best = max(best, (10 if device == "cuda" else 2) * 2 * n ** 3 / dt)
    return best


def flops_per_token_pair(mc, vocab: int, src_len: float, tgt_len: float) -> tuple[float, float]:
    """Training FLOPs (3x forward) per encoder token and per decoder token of a T5 (matmuls + attention)."""
    d, inner, dff = mc.d_model, mc.num_heads * mc.d_kv, mc.d_ff
    enc = mc.num_layers * (2 * 4 * d * inner + 2 * 2 * d * dff + 2 * 2 * src_len * inner)
    enc += mc.num_decoder_layers * 2 * 2 * d * inner  # cross-attention keys and values of each source token
    dec = mc.num_decoder_layers * (2 * 4 * d * inner + 2 * 2 * d * inner + 2 * 2 * d * dff
                                   + 2 * 2 * tgt_len * inner + 2 * 2 * src_len * inner)
    dec += 2 * d * vocab  # LM head
    return 3 * enc, 3 * dec


class LoopTimer:
    """TrainerCallback timing the training loop (wall and process CPU seconds), as train.py's fit loop does."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_train_end(self, args, state, control, **kw):
                self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

        return _Timer()


class CountingCollator:
    """Seq2SeqCollator that records each batch's non-pad tokens (for the HF runs' token counts)."""

    def __init__(self):
        from model.data.dataset import Seq2SeqCollator
        self.inner, self.counts, self.sizes = Seq2SeqCollator(), [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.counts.append((int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()),
                            batch["input_ids"].shape[1], batch["labels"].shape[1]))
        self.sizes.append(batch["input_ids"].shape[0])
        return batch


def prepare(out: Path, train_file: str, preset: str, vocab_size: int, max_len: int,
            overrides: Optional[dict] = None) -> Path:
    """A tokenizer trained on the bench data and a randomly initialised model folder both trainers start from
    (``overrides``: ModelConfig fields over the preset)."""
    import pandas as pd
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    from model.tokenizer.build import train_tokenizer
    df = pd.read_parquet(train_file, columns=["prompt", "response"])
    texts = df["prompt"].tolist() + df["response"].tolist()
    tok = train_tokenizer(texts, vocab_size=min(vocab_size, 8192), token_type="char")
    torch.manual_seed(0)
    model = TextToTextModel.from_preset(preset, vocab_size=max(vocab_size, len(tok)), **(overrides or {}))
    return save_model_folder(model, tok, out / "init")


def run_ours(base: dict, init: Path, out: Path, device: str, packing: bool) -> dict:
    from model.training.trainer import train, train_config
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = train(train_config(None, init_from=str(init), output_dir=str(out), packing=packing, **base))
    tokens = res["train_tokens"]
    secs = res["runtime_s"] if device == "cuda" else res["cpu_s"]
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "wall_tokens_per_s": tokens / res["runtime_s"],
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
            "final_loss": res.get("loss"), "pad_share": res["pad_share"]}


def run_hf(base: dict, init: Path, out: Path, device: str, group: bool, steps: int) -> dict:
    from model.training.trainer import hf_train, train_config
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    coll, timer = CountingCollator(), LoopTimer()
    res = hf_train(train_config(None, init_from=str(init), output_dir=str(out), **base),
                   reference_settings=True, group_by_length=group, data_collator=coll, callbacks=[timer])
    used = coll.counts[:steps]  # the dataloader may have collated one batch ahead
    tokens = sum(a + b for a, b, _, _ in used)
    secs = timer.wall if device == "cuda" else timer.cpu
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "wall_tokens_per_s": tokens / timer.wall,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
            "final_loss": res.get("train_loss"), "counts": used,
            "pad_share": 1 - tokens / sum(len_s * bs + len_t * bs for (_, _, len_s, len_t), bs in
                                          zip(used, coll.sizes[:steps]))}


def main(quick: bool = False, device: str = "cpu", preset: str = "small", bf16: bool = False,
         batch_size: int = 8, steps: int = 0, max_len: int = 256, num_threads: int = 1, rounds: int = 0,
         train_file: str = str(DEFAULT_DATA), out_dir: str = "bench/out/train") -> dict:
    torch.set_num_threads(num_threads)
    if not Path(train_file).is_file():
        raise FileNotFoundError(f"{train_file} not found: the bench reads ../shared/data (or pass --train_file)")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    steps = steps or (12 if quick else 24)
    rounds = rounds or (1 if quick else 2)
    if quick:
        max_len = min(max_len, 128)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    mc = model_config(preset)
    init = prepare(out, train_file, preset, mc.vocab_size, max_len)
    vocab = json.loads((init / "config.json").read_text())["vocab_size"]
    mp = "bf16" if bf16 else "no"
    base = dict(preset=preset, train_file=train_file, valid_file=None, batch_size_per_gpu=batch_size,
                max_steps=steps, max_source_len=max_len, max_target_len=max_len, learning_rate=1e-4,
                warmup_steps=0.1, save_steps=10 ** 9, eval_steps=10 ** 9, logging_steps=steps, log_with="none",
                show_progress=False, num_threads=num_threads, mixed_precision=mp, cpu=device == "cpu",
                seed=42, keep_last_n=1, save_best=False)
    runs: dict[str, list] = {"ours": [], "ours_grouped": [], "hf_ref": [], "hf_grouped": []}
    for r in range(rounds):
        runs["ours"].append(run_ours(base, init, out / f"ours{r}", device, packing=True))
        runs["ours_grouped"].append(run_ours(base, init, out / f"ours_grouped{r}", device, packing=False))
        runs["hf_ref"].append(run_hf(base, init, out / f"hf_ref{r}", device, False, steps))
        runs["hf_grouped"].append(run_hf(base, init, out / f"hf_grouped{r}", device, True, steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.0f} tok/s" for k, v in runs.items()),
              flush=True)
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in runs.items()}
    # MFU: model FLOPs of the non-pad tokens (mean lengths from the HF run's batches) / measured matmul peak
    counts = best["hf_ref"]["counts"]
    src_len = sum(c[0] for c in counts) / (len(counts) * batch_size)
    tgt_len = sum(c[1] for c in counts) / (len(counts) * batch_size)
    f_src, f_tgt = flops_per_token_pair(mc, vocab, src_len, tgt_len)
    flops_per_token = (f_src * src_len + f_tgt * tgt_len) / (src_len + tgt_len)
    peak = measure_peak_flops(device, torch.bfloat16 if (bf16 and device == "cuda") else torch.float32)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForSeq2SeqLM.from_pretrained(
        str(init)).parameters())
    result = {"bench": "train", "ratio": round(best["ours"]["tokens_per_s"] / best["hf_ref"]["tokens_per_s"], 3),
              "ratio_vs_hf_grouped": round(best["ours"]["tokens_per_s"] / best["hf_grouped"]["tokens_per_s"], 3),
              "pad_share": round(best["ours"]["pad_share"], 4),
              "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({num_threads} thread(s))",
              "preset": preset, "params": params, "dtype": mp, "batch_size": batch_size, "steps": steps,
              "rounds": rounds, "max_len": max_len, "data": str(train_file),
              "seconds": "wall-clock" if device == "cuda" else "process CPU time",
              "peak_matmul_tflops": round(peak / 1e12, 4), "flops_per_token": round(flops_per_token)}
    for k, v in best.items():
        result[f"{k}_tokens_per_s"] = round(v["tokens_per_s"], 1)
        result[f"{k}_all_rounds_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in runs[k]]
        result[f"{k}_wall_tokens_per_s"] = round(v["wall_tokens_per_s"], 1)
        result[f"{k}_mfu"] = round(v["tokens_per_s"] * flops_per_token / peak, 4)
        result[f"{k}_pad_share"] = round(v["pad_share"], 4)
        if v["peak_gpu_mem_gb"] is not None:
            result[f"{k}_peak_gpu_mem_gb"] = round(v["peak_gpu_mem_gb"], 3)
    print(json.dumps(result))
    return result


def precision(shape: str = "cpu", steps: int = 300, rounds: int = 2, batch_size: int = 16, max_len: int = 128,
              num_threads: int = 1, train_file: str = str(DEFAULT_DATA), out_dir: str = "bench/out/train_precision"
              ) -> dict:
    """fp32 against bf16 autocast on this CPU, the same trainer, weights, data and updates, in one run.

    ``shape``: ``cpu`` (the cpu profile's model, config.CPU_MODEL over `small`) or a model preset; 8,192 tokens.
    Figures: tokens per CPU-second of each (best of ``rounds``, alternating), ``ratio`` = bf16 / fp32, and the
    training loss at every tenth of the run for both, so a speed-up that learns less per update shows.
    """
    from config import CPU_MODEL
    from model.training.engine import cpu_has_native_bf16
    from model.training.trainer import train, train_config
    torch.set_num_threads(num_threads)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    preset, overrides = ("small", CPU_MODEL) if shape == "cpu" else (shape, {})
    init = prepare(out, train_file, preset, 8192, max_len, overrides)
    every = max(1, steps // 10)
    base = dict(preset=preset, train_file=train_file, valid_file=None,
                batch_size_per_gpu=batch_size, max_steps=steps, max_source_len=max_len, max_target_len=max_len,
                learning_rate=2e-3, lr_scheduler="constant", warmup_steps=0, save_steps=10 ** 9,
                eval_steps=10 ** 9, logging_steps=every, log_with="none", show_progress=False,
                num_threads=num_threads, cpu=True, seed=42, keep_last_n=1, save_best=False, packing=True)
    best: dict[str, dict] = {}
    for r in range(rounds):
        for mp in ("no", "bf16"):
            d = out / f"{mp}{r}"
            res = train(train_config(None, init_from=str(init), output_dir=str(d), mixed_precision=mp, **base))
            rate = res["train_tokens"] / res["cpu_s"]
            curve = [[m["step"], round(m["loss"], 4)] for m in map(json.loads, (d / "metrics.jsonl").open())
                     if m.get("split") == "train" and "loss" in m]
            if rate > best.get(mp, {}).get("tokens_per_cpu_s", 0):
                best[mp] = {"tokens_per_cpu_s": round(rate, 1), "loss_curve": curve}
            print(f"round {r + 1} {mp}: {rate:.0f} tokens per CPU-second, loss {curve[-1][1]}", flush=True)
    result = {"bench": "train_precision", "ratio": round(best["bf16"]["tokens_per_cpu_s"]
                                                         / best["no"]["tokens_per_cpu_s"], 3),
              "native_bf16": cpu_has_native_bf16(), "shape": shape, "steps": steps, "batch_size": batch_size,
              "max_len": max_len, "threads": num_threads, "fp32": best["no"], "bf16": best["bf16"]}
    print(json.dumps(result))
    return result


def _train_timed(kw: dict) -> dict:
    """One training run in its own process (its own thread count): updates and wall seconds of its loop."""
    from model.training.trainer import train, train_config
    torch.set_num_threads(kw["num_threads"])
    res = train(train_config(None, **kw))
    return {"steps": res["steps"], "runtime_s": res["runtime_s"], "loss": res.get("loss")}


def side_by_side(shape: str = "cpu", steps: int = 300, threads: int = 2, batch_size: int = 16, max_len: int = 128,
                 train_file: str = str(DEFAULT_DATA), out_dir: str = "bench/out/train_side_by_side") -> dict:
    """Two training runs on a machine of ``threads`` cores: one after the other at ``threads`` threads each (the
    baseline) against side by side at ``threads // 2`` each, the same model, data and updates. Figure: updates per
    wall-second of the training loops together; ``ratio`` = side by side / in turn. Wall-clock: run it on a quiet
    machine. The pipeline's two IE fine-tunes (``PipelineConfig.ie_parallel``) are such a pair."""
    import multiprocessing as mp
    from config import CPU_MODEL
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    preset, overrides = ("small", CPU_MODEL) if shape == "cpu" else (shape, {})
    init = prepare(out, train_file, preset, 8192, max_len, overrides)
    base = dict(preset=preset, train_file=train_file, valid_file=None, init_from=str(init),
                batch_size_per_gpu=batch_size, max_steps=steps, max_source_len=max_len, max_target_len=max_len,
                learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, save_steps=10 ** 9, eval_steps=10 ** 9,
                logging_steps=steps, log_with="none", show_progress=False, cpu=True, keep_last_n=1, save_best=False)
    runs = [dict(base, seed=seed, output_dir=str(out / f"run{seed}")) for seed in (1, 2)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:  # in turn: the baseline
        in_turn = [pool.apply(_train_timed, (dict(r, num_threads=threads),)) for r in runs]
    with ctx.Pool(2) as pool:
        together = pool.map(_train_timed, [dict(r, num_threads=max(1, threads // 2)) for r in runs])
    rate_turn = sum(r["steps"] for r in in_turn) / sum(r["runtime_s"] for r in in_turn)
    rate_side = sum(r["steps"] for r in together) / max(r["runtime_s"] for r in together)
    result = {"bench": "train_side_by_side", "ratio": round(rate_side / rate_turn, 3), "shape": shape,
              "steps": steps, "threads": threads, "cpu_count": os.cpu_count(),
              "in_turn_updates_per_s": round(rate_turn, 3), "side_by_side_updates_per_s": round(rate_side, 3),
              "in_turn": in_turn, "side_by_side": together}
    print(json.dumps(result))
    return result


def _cli(**kwargs) -> None:
    main(**kwargs)


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["precision"]:
        fire.Fire(lambda **kw: precision(**kw) and None, sys.argv[2:])
    elif sys.argv[1:2] == ["side_by_side"]:
        fire.Fire(lambda **kw: side_by_side(**kw) and None, sys.argv[2:])
    else:
        fire.Fire(_cli)
