"""How much GPU memory a preset needs per GPU under DDP, DeepSpeed ZeRO-2 and FSDP full-shard, before renting GPUs.

Parameters, gradients and optimizer states are counted from the model's real shape (built on the meta device, so
a 0.7B model costs no memory); activations are measured on this CPU: a real forward of the preset at batch 1
records the bytes autograd keeps for backward (parameters excluded), at two sequence lengths, fitted as
``a s + b s^2`` per sample (linear layers and attention scores) and scaled to the batch and length of the plan.

Byte counts per parameter (AdamW, bf16 mixed precision as the configs in configs/ run it, P parameters, N GPUs):

- DDP (accelerate's autocast): fp32 weights 4P, fp32 gradients 4P plus DDP's fp32 buckets 4P when N > 1 (the
  gradients are copied into them for the all-reduce), AdamW moments 8P.
- ZeRO-2 (DeepSpeed bf16): bf16 weights 2P on every GPU, bf16 gradient shards 2P/N plus the reduce bucket of
  ``configs/deepspeed_zero2.json``, fp32 master weights and moments 12P/N (the ZeRO paper's K = 12).
- FSDP2 full-shard (accelerate's bf16 policy: bf16 gather and reduce): fp32 weight shards 4P/N, fp32 gradient
  shards 4P/N, moments 8P/N; while a unit runs, its bf16 weights are gathered (the root unit, embedding and
  final norms, for the whole step; two T5 blocks at a time with prefetch) and its bf16 gradient exists whole until
  reduce-scattered.

Activations are the fp32 measurement: bf16 autocast stores most matmul inputs in half the bytes, so GPU runs need
up to that much, not more.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 1e9
SETUPS = ("DDP", "ZeRO-2", "FSDP")


@dataclass
class Shape:
    """What the plan needs to know of a model: its parameter count and its largest FSDP units."""

    params: int  # unique parameters (tied embedding once)
    block: int  # parameters of the largest T5 block (one FSDP unit)
    root: int  # parameters outside the blocks (the root unit: embedding, final norms)


@dataclass
class Activations:
    """Bytes kept for backward per sample: ``linear * s + quadratic * s^2`` at source = target length ``s``."""

    linear: float
    quadratic: float

    def per_sample(self, source_len: int, target_len: int) -> float:
        s = max(source_len, target_len)  # the longer side bounds both
        return self.linear * s + self.quadratic * s * s


def build_meta_model(preset: str, vocab_size: int):
    """The preset's model with its weights on the meta device: shapes only, no memory."""
    from model.chat_model import TextToTextModel
    from model.chat_model_config import t5_config
    with torch.device("meta"):
        return TextToTextModel(t5_config(preset, vocab_size=vocab_size))


def model_shape(model) -> Shape:
    """Counts of ``model``: all unique parameters, the largest T5 block, and the rest (the root unit)."""
    from transformers.models.t5.modeling_t5 import T5Block
    params = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, T5Block)]
    return Shape(params=params, block=max(blocks), root=params - sum(blocks))


def saved_bytes(model, batch: int, source_len: int, target_len: int) -> int:
    """Bytes autograd keeps for backward in one training forward (dropout on) at this batch and length, weights
    excluded; then the backward runs, as in training."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(7, model.config.vocab_size, (batch, source_len), generator=gen)
    labels = torch.randint(7, model.config.vocab_size, (batch, target_len), generator=gen)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.target_loss(ids, torch.ones_like(ids), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def measure_activations(preset: str, vocab_size: int, lens: tuple) -> Activations:
    """Two batch-1 measurements of the real shape (random weights) at source = target lengths ``lens``, solved for
    the linear and quadratic terms."""
    from model.chat_model import TextToTextModel
    from model.chat_model_config import t5_config
    torch.manual_seed(0)
    model = TextToTextModel(t5_config(preset, vocab_size=vocab_size))
    (s1, s2), (m1, m2) = lens, [saved_bytes(model, 1, s, s) for s in lens]
    quadratic = (m2 / s2 - m1 / s1) / (s2 - s1)
    return Activations(linear=m1 / s1 - quadratic * s1, quadratic=quadratic)


def zero2_bucket_bytes(config_file: str | Path) -> int:
    """The bf16 reduce bucket ZeRO-2 allocates (``reduce_bucket_size`` elements of the DeepSpeed config)."""
    zero = json.loads(Path(config_file).read_text(encoding="utf-8"))["zero_optimization"]
    return 2 * int(zero["reduce_bucket_size"])


def per_gpu(setup: str, shape: Shape, gpus: int, activations: float, bucket: int) -> dict:
    """Bytes per GPU of one setup: weights, gradients, optimizer states, activations, and their total."""
    p, n = shape.params, gpus
    if setup == "DDP":
        row = dict(weights=4 * p, grads=4 * p + (4 * p if n > 1 else 0), optimizer=8 * p)
    elif setup == "ZeRO-2":
        row = dict(weights=2 * p, grads=2 * p / n + bucket, optimizer=12 * p / n)
    elif setup == "FSDP":
        gathered = 2 * (shape.root + 2 * shape.block)
        row = dict(weights=4 * p / n + gathered, grads=4 * p / n + 2 * shape.block, optimizer=8 * p / n)
    else:
        raise ValueError(f"unknown setup {setup!r}; expected one of {', '.join(SETUPS)}")
    row["activations"] = activations
    row["total"] = sum(row.values())
    return row


def fits(total: float, gpu_gb: tuple, usable_share: float) -> list[int]:
    """The GPU sizes (GB) whose usable share holds ``total`` bytes."""
    return [g for g in gpu_gb if total <= usable_share * g * GB]


def plan(cfg, shape: Shape, act: Activations) -> list[dict]:
    """One row per (setup, GPU count): the per-GPU bytes and the GPU sizes that hold them."""
    activations = cfg.batch_size_per_gpu * act.per_sample(cfg.max_source_len, cfg.max_target_len)
    bucket = zero2_bucket_bytes(cfg.zero2_config)
    rows = []
    for setup in SETUPS:
        for n in cfg.gpus:
            row = per_gpu(setup, shape, n, activations, bucket)
            rows.append(dict(setup=setup, gpus=n, **row, fits=fits(row["total"], cfg.gpu_gb, cfg.usable_share)))
    return rows


def markdown(cfg, shape: Shape, act: Activations, rows: list[dict]) -> str:
    """The plan as the table docs/training.md carries."""
    s = max(cfg.max_source_len, cfg.max_target_len)
    head = (f"`{cfg.preset}`: {shape.params / 1e6:,.1f}M parameters (largest block {shape.block / 1e6:.1f}M, root "
            f"{shape.root / 1e6:.1f}M); batch {cfg.batch_size_per_gpu} per GPU, {cfg.max_source_len}+"
            f"{cfg.max_target_len} tokens; activations {act.per_sample(s, s) / GB:.3f} GB per sample "
            f"(measured fp32, {act.linear / 1e6:.2f} MB x s + {act.quadratic / 1e3:.2f} kB x s^2)")
    lines = [head, "", "| setup | GPUs | weights GB | grads GB | optimizer GB | activations GB | total GB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fit = f"{min(r['fits'])} GB and up" if r["fits"] else "none"
        lines.append(f"| {r['setup']} | {r['gpus']} | {r['weights'] / GB:.2f} | {r['grads'] / GB:.2f} | "
                     f"{r['optimizer'] / GB:.2f} | {r['activations'] / GB:.2f} | {r['total'] / GB:.2f} | {fit} |")
    return "\n".join(lines)


def memory_plan(cfg) -> tuple[str, list[dict]]:
    """(the table, its rows) for ``cfg`` (a ``config.PlanConfig``)."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    shape = model_shape(build_meta_model(cfg.preset, cfg.vocab_size))
    act = measure_activations(cfg.preset, cfg.vocab_size, tuple(cfg.measure_lens))
    rows = plan(cfg, shape, act)
    return markdown(cfg, shape, act, rows), rows
