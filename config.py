"""Configuration for every stage, as dataclasses with presets.

Every script builds its config with ``make_config(Cls, preset=..., **overrides)`` so that any field can be
overridden from the command line through fire (``--learning_rate=1e-4``). Unknown keys raise a clear error
instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Fixed special tokens (DESIGN.md contract): ids 0..6 in this order.
SPECIAL_TOKENS = ["[PAD]", "[EOS]", "[SEP]", "[BOS]", "[CLS]", "[MASK]", "[UNK]"]
PAD_ID, EOS_ID, SEP_ID, BOS_ID, CLS_ID, MASK_ID, UNK_ID = range(7)
DEFAULT_NUM_SENTINELS = 100


def sentinel_token(i: int) -> str:
    """Name of the i-th span-corruption sentinel; ids follow the 7 fixed ids (7, 8, ...)."""
    return f"<extra_id_{i}>"


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """T5 shape. ``base`` is the reference project's 0.2B model."""

    vocab_size: int = 29298
    d_model: int = 768
    num_layers: int = 10
    num_decoder_layers: int = 10
    num_heads: int = 12
    d_kv: int = 64
    d_ff: int = 3072
    dropout_rate: float = 0.1
    feed_forward_proj: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_word_embeddings: bool = True
    max_seq_len: int = 512


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # the reference's T5 (about 0.2B parameters with the 29,298-token vocabulary)
    "base": dict(d_model=768, num_layers=10, num_decoder_layers=10, num_heads=12, d_kv=64, d_ff=3072),
    # CPU experiments: trains at a few hundred tokens/s on 2 cores
    "small": dict(d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64, d_ff=1536,
                  vocab_size=8192),
    # tests and the demo: seconds per hundred steps on a CPU
    "tiny": dict(d_model=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32, d_ff=512,
                 vocab_size=2048, dropout_rate=0.0, max_seq_len=128),
}


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """Pretraining (and, with ``is_finetune=True``, SFT) through the project's accelerate trainer."""

    preset: str = "small"
    train_file: str = "data/generated/all/my_train_dataset.parquet"
    valid_file: Optional[str] = "data/generated/all/my_valid_dataset.parquet"
    tokenizer_dir: str = "model_save/tokenizer"
    output_dir: str = "model_save/pretrain"
    init_from: Optional[str] = None  # a model folder to start from (SFT: the pretrained model)
    is_finetune: bool = False
    is_keep_training: bool = False
    freeze: str = "none"  # none | decoder_only (reference SFT: embeddings and encoder frozen)
    epochs: int = 1
    max_steps: int = -1
    batch_size_per_gpu: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | adafactor
    lr_scheduler: str = "cosine"  # cosine | onecycle | constant
    warmup_steps: float = 0.02  # a fraction of total steps when < 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | fp16 | bf16
    max_source_len: int = 256
    max_target_len: int = 256
    streaming: bool = False
    shuffle_buffer: int = 10000
    group_by_length: bool = True
    text_mode: str = "prefix"  # how `text` rows become pairs: prefix | span | mix
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    save_steps: int = 1000
    eval_steps: int = 1000
    logging_steps: int = 20
    keep_last_n: int = 2
    bleu_samples: int = 32
    seed: int = 23333
    num_workers: int = 0
    log_with: str = "tensorboard"


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "sft": dict(is_finetune=True, learning_rate=1e-4, output_dir="model_save/sft",
                train_file="data/generated/all/my_train_dataset.parquet", freeze="none"),
}


@dataclass
class DPOConfig:
    sft_model_dir: str = "model_save/sft"
    train_file: str = "data/generated/dpo/my_dpo_train.parquet"
    valid_file: Optional[str] = None
    output_dir: str = "model_save/dpo"
    loss_type: str = "sigmoid"  # sigmoid | ipo
    beta: float = 0.1
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple = ("q", "k", "v", "o")
    precompute_ref_logps: bool = True
    epochs: int = 1
    max_steps: int = -1
    batch_size_per_gpu: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: float = 0.1
    max_source_len: int = 256
    max_target_len: int = 256
    save_steps: int = 500
    eval_steps: int = 100
    logging_steps: int = 10
    seed: int = 23333
    is_keep_training: bool = False


@dataclass
class InferConfig:
    model_dir: str = "model_save/sft"
    search_type: str = "greedy"  # greedy | beam | sampling | contrastive
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    history_tokens: int = 384
    num_beams: int = 4
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    penalty_alpha: float = 0.6
    contrastive_top_k: int = 4
    device: str = "auto"
    engine: str = "torch"  # torch | ct2
    # API server
    host: str = "127.0.0.1"
    port: int = 8812
    api_key: Optional[str] = None  # or env CHATLM_API_KEY; None means no auth
    max_body_bytes: int = 64 * 1024
    max_concurrency: int = 2
    max_queue: int = 16


# ----------------------------------------------------------------------------------------- helpers
def make_config(cls, preset: Optional[str] = None, presets: Optional[dict] = None, **overrides):
    """Build ``cls`` from a named preset plus overrides; unknown keys are an error, not silently dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if preset is not None:
        if presets is None or preset not in presets:
            known = ", ".join(sorted(presets or {}))
            raise ValueError(f"unknown preset {preset!r} for {cls.__name__}; known presets: {known}")
        values.update(presets[preset])
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; "
                         f"valid options: {', '.join(sorted(names))}")
    return cls(**values)


def model_config(preset: str = "small", **overrides) -> ModelConfig:
    return make_config(ModelConfig, preset, MODEL_PRESETS, **overrides)


def asdict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
