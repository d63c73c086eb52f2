"""Maps the project's ModelConfig onto a plain ``T5Config`` so checkpoints load without project code."""
from __future__ import annotations

from transformers import GenerationConfig, T5Config

from config import EOS_ID, GENERATION_DEFAULTS, PAD_ID, ModelConfig, model_config


def t5_config(cfg: ModelConfig | str = "small", vocab_size: int | None = None, **overrides) -> T5Config:
    """A ``T5Config`` (model_type ``t5``) for a preset name or a ModelConfig.

    ``vocab_size`` follows the tokenizer when given, so a model never has fewer embeddings than token ids.
    """
    if isinstance(cfg, str):
        cfg = model_config(cfg, **overrides)
    return T5Config(
        vocab_size=vocab_size or cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate,
        feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        use_cache=True,
    )


def default_generation_config(**overrides) -> GenerationConfig:
    """What ``generation_config.json`` holds: greedy decoding with the chat defaults (``GENERATION_DEFAULTS``),
    so ``model.generate`` in plain transformers answers as ``ChatBot`` does."""
    return GenerationConfig(
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, decoder_start_token_id=PAD_ID,
        do_sample=False, num_beams=1, use_cache=True, **{**GENERATION_DEFAULTS, **overrides})
