"""The memory plan's arithmetic on the tiny preset: parameter counts exact, bytes per setup as documented, the
activation measurement exactly quadratic in the sequence length."""
from __future__ import annotations

import pytest
import torch

from config import PIPELINE_PROFILES, PlanConfig
from model.training.memory_plan import (Activations, Shape, build_meta_model, fits, model_shape, per_gpu, plan,
                                        saved_bytes, zero2_bucket_bytes)

# tiny: d_model 128, 4 heads of 32 (inner 128), d_ff 512, 2+2 blocks, 32 position buckets, vocab 1024
ATTENTION = 4 * 128 * 128  # q, k, v, o
FFN = 2 * 128 * 512  # wi, wo
ENCODER_BLOCK0 = ATTENTION + FFN + 2 * 128 + 32 * 4  # two layer norms, the relative position bias
DECODER_BLOCK0 = 2 * ATTENTION + FFN + 3 * 128 + 32 * 4  # self- and cross-attention
ROOT = 1024 * 128 + 2 * 128  # the tied embedding, the two final layer norms
PARAMS = ROOT + 2 * ENCODER_BLOCK0 - 32 * 4 + 2 * DECODER_BLOCK0 - 32 * 4  # only block 0 has the bias
TINY = Shape(params=PARAMS, block=DECODER_BLOCK0, root=ROOT)


def test_counts_of_the_tiny_preset_are_exact():
    from model.chat_model import TextToTextModel
    from model.chat_model_config import t5_config
    assert model_shape(build_meta_model("tiny", 1024)) == TINY
    real = TextToTextModel(t5_config("tiny", vocab_size=1024))
    assert sum(p.numel() for p in real.parameters()) == PARAMS == 1_050_368


def test_bytes_per_gpu_of_each_setup():
    p, act, bucket = PARAMS, 1000.0, zero2_bucket_bytes(PlanConfig.zero2_config)
    assert bucket == 2 * 200_000_000  # bf16 elements of configs/deepspeed_zero2.json's reduce bucket
    ddp1, ddp8 = per_gpu("DDP", TINY, 1, act, bucket), per_gpu("DDP", TINY, 8, act, bucket)
    assert (ddp1["weights"], ddp1["grads"], ddp1["optimizer"]) == (4 * p, 4 * p, 8 * p)
    assert ddp8["grads"] == 8 * p and ddp8["total"] == 20 * p + act  # DDP's buckets once there is a peer
    zero = per_gpu("ZeRO-2", TINY, 8, act, bucket)
    assert (zero["weights"], zero["grads"], zero["optimizer"]) == (2 * p, 2 * p / 8 + bucket, 12 * p / 8)
    fsdp = per_gpu("FSDP", TINY, 8, act, bucket)
    assert fsdp["weights"] == 4 * p / 8 + 2 * (ROOT + 2 * DECODER_BLOCK0)
    assert (fsdp["grads"], fsdp["optimizer"]) == (4 * p / 8 + 2 * DECODER_BLOCK0, 8 * p / 8)
    assert fsdp["total"] == sum(fsdp[k] for k in ("weights", "grads", "optimizer", "activations"))
    with pytest.raises(ValueError):
        per_gpu("ZeRO-3", TINY, 8, act, bucket)


def test_plan_rows_and_fits():
    cfg = PlanConfig(preset="tiny", vocab_size=1024, gpus=(1, 16), gpu_gb=(24, 80))
    rows = plan(cfg, TINY, Activations(linear=1e6, quadratic=0.0))  # 1 MB per token: 16 x 256 MB
    assert [(r["setup"], r["gpus"]) for r in rows] == [(s, n) for s in ("DDP", "ZeRO-2", "FSDP") for n in (1, 16)]
    assert all(r["activations"] == 16 * 256 * 1e6 for r in rows)
    assert fits(21.5e9, (24, 40, 80), 0.9) == [24, 40, 80] and fits(21.7e9, (24, 40, 80), 0.9) == [40, 80]


def test_plan_defaults_are_the_gpu_profiles_pretraining():
    pre = PIPELINE_PROFILES["gpu"]["pretrain"]
    cfg = PlanConfig()
    assert (cfg.preset, cfg.batch_size_per_gpu, cfg.max_source_len, cfg.max_target_len) == (
        pre["preset"], pre["batch_size_per_gpu"], pre["max_source_len"], pre["max_target_len"])
    assert cfg.vocab_size == PIPELINE_PROFILES["gpu"]["tokenizer"]["vocab_size"]


def test_activation_bytes_are_quadratic_in_length():
    """What the plan scales: bytes kept for backward at equally spaced lengths have equal second differences
    (linear layers: s; attention scores and the position bias: s^2), exactly, in bytes."""
    from model.chat_model import TextToTextModel
    from model.chat_model_config import t5_config
    torch.manual_seed(0)
    model = TextToTextModel(t5_config("tiny", vocab_size=1024))
    m = [saved_bytes(model, 1, s, s) for s in (16, 32, 48, 64)]
    assert m[2] - 2 * m[1] + m[0] == m[3] - 2 * m[2] + m[1] > 0
