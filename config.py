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
    """Pretraining (and, with ``is_finetune=True``, SFT) through the project's accelerate trainer.

    ``train_file`` takes one file or several separated by commas, each optionally followed by ``:weight``
    (``corpus.parquet:2,sft.parquet:0.5``): a weight is how many times the file's rows are used per epoch.
    Files are parquet (``prompt``/``response`` or ``text`` columns) or ``.txt`` (one document per line).
    """

    preset: str = "small"  # model preset (tiny | small | base) for a model trained from scratch
    stage: Optional[str] = None  # the TRAIN_PRESETS entry this config came from (informational)
    train_file: str = "data/generated/all/my_train_dataset.parquet"
    valid_file: Optional[str] = "data/generated/all/my_valid_dataset.parquet"
    tokenizer_dir: str = "model_save/tokenizer"
    output_dir: str = "model_save/pretrain"
    init_from: Optional[str] = None  # a model folder to start from (SFT: the pretrained model)
    is_finetune: bool = False
    is_keep_training: bool = False
    freeze: str = "none"  # none | decoder_only (reference SFT: embeddings and encoder frozen)
    dropout_rate: Optional[float] = None  # overrides the model's dropout (preset or pretrained config)
    epochs: int = 1
    max_steps: int = -1  # optimizer updates; > 0 overrides epochs
    batch_size_per_gpu: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    optimizer: str = "adamw"  # adamw | adafactor (external LR: the schedule applies)
    lr_scheduler: str = "cosine"  # cosine | onecycle | constant
    warmup_steps: float = 0.02  # a fraction of total steps when < 1
    min_lr_ratio: float = 0.1  # cosine ends at learning_rate * min_lr_ratio
    div_factor: float = 25.0  # onecycle starts at learning_rate / div_factor
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | fp16 | bf16
    cpu: bool = False  # train on CPU even when a GPU is visible
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    max_source_len: int = 256
    max_target_len: int = 256
    streaming: bool = False
    shuffle_buffer: int = 10000
    group_by_length: bool = True
    length_group_batches: int = 64  # batches sorted together when grouping by length
    pad_to_multiple_of: int = 0  # 8 helps tensor cores on GPU; 0 pads to the batch's longest
    text_mode: str = "prefix"  # how `text` rows become pairs: prefix | span | mix
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    save_steps: int = 1000
    eval_steps: int = 1000
    logging_steps: int = 20
    keep_last_n: int = 2  # newest checkpoints kept (plus the best one by eval loss)
    save_best: bool = True  # export the best model by eval loss to output_dir/best (plain HF folder)
    max_eval_samples: int = 1000
    eval_batch_size: int = 32
    bleu_samples: int = 32
    seed: int = 23333
    num_workers: int = 0
    log_with: str = "tensorboard"  # tensorboard | none
    show_progress: bool = True
    debug_dump_samples: bool = False  # tests: each rank writes the keys of the samples it trained on
    debug_signal: Optional[str] = None  # tests: "STEP:SIGNAME" sends that signal to this process after STEP


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "sft": dict(is_finetune=True, learning_rate=1e-4, output_dir="model_save/sft",
                train_file="data/generated/all/my_train_dataset.parquet", freeze="none",
                init_from="model_save/pretrain"),
    # `make demo`: the tiny model on the embedded demo data. Measured (README "SFT"): lr 3e-3 left the held-out
    # answers wrong; lr 1e-3, dropout 0.1, prefix pretraining on the corpus then SFT got 2 of 3 right.
    "demo_pretrain": dict(preset="tiny", train_file="data/demo/corpus.txt", valid_file="data/demo/sft_valid.parquet",
                          tokenizer_dir="model_save/demo/tokenizer", output_dir="model_save/demo/pretrain",
                          text_mode="prefix", batch_size_per_gpu=32, learning_rate=1e-3, lr_scheduler="onecycle",
                          warmup_steps=0.1, dropout_rate=0.1, max_steps=800, max_source_len=64, max_target_len=64,
                          save_steps=100000, eval_steps=100000, bleu_samples=8, num_threads=1, log_with="none"),
    "demo_sft": dict(preset="tiny", is_finetune=True, train_file="data/demo/sft.parquet",
                     valid_file="data/demo/sft_valid.parquet", init_from="model_save/demo/pretrain",
                     output_dir="model_save/demo/sft", batch_size_per_gpu=32, learning_rate=1e-3,
                     lr_scheduler="onecycle", warmup_steps=0.1, dropout_rate=0.1, max_steps=2000, max_source_len=64,
                     max_target_len=64, save_steps=100000, eval_steps=100000, bleu_samples=8, num_threads=1,
                     log_with="none"),
}


@dataclass
class DPOConfig:
    """Preference optimisation (DPO/IPO) of the SFT model, full or LoRA (model/dpo.py, dpo_train.py)."""

    sft_model_dir: str = "model_save/sft"
    ref_model_dir: Optional[str] = None  # the reference policy; default: the SFT model itself
    train_file: str = "data/generated/dpo/my_dpo_train.parquet"
    valid_file: Optional[str] = None  # held-out pairs (build writes my_dpo_valid.parquet); None: train_file
    output_dir: str = "model_save/dpo"
    loss_type: str = "sigmoid"  # sigmoid | ipo
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple = ("q", "k", "v", "o")  # T5 attention projections; "q,k,v,o,wi,wo" adds the FFN
    merge_lora: bool = True  # after LoRA training also write a merged plain folder to output_dir/merged
    precompute_ref_logps: bool = True  # one reference pass before training; no reference model in memory
    epochs: int = 1
    max_steps: int = -1
    batch_size_per_gpu: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # any transformers scheduler name: cosine | linear | constant_with_warmup
    warmup_steps: float = 0.1  # a fraction of total steps when < 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | fp16 | bf16
    max_source_len: int = 256
    max_target_len: int = 256
    group_by_length: bool = True
    save_steps: int = 500  # 0: no checkpoints
    keep_last_n: int = 2
    eval_steps: int = 100
    logging_steps: int = 10
    seed: int = 23333
    is_keep_training: bool = False
    num_threads: int = 0  # CPU threads for torch (0: leave torch's default)
    show_progress: bool = True


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
    # multi-turn prompt: "q1[SEP]a1[SEP]q2" + [EOS] (the tokenizer maps "[SEP]" to its special id)
    model_name: Optional[str] = None  # the id /v1/models reports; default: the model folder's name
    torch_threads: int = 0  # 0 leaves torch's default
    stream_interval_s: float = 0.02  # streamed pieces closer than this are sent together (fewer thread wake-ups)
    # CTranslate2 (--engine ct2): converted once into ct2_dir (default <model_dir>/ct2), int8 on CPU
    ct2_compute_type: str = "auto"  # auto (int8 on CPU, int8_float16 on GPU) | int8 | float32 | ...
    ct2_dir: Optional[str] = None


# ----------------------------------------------------------------------------------------- helpers
def make_config(cls, preset: Optional[str] = None, presets: Optional[dict] = None, /, **overrides):
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


# ------------------------------------------------------------------------------------------ pipeline
@dataclass
class PipelineConfig:
    """One config from raw data to a chat model (pipeline.py); each stage's own config takes the overrides."""

    profile: str = "demo"
    root: str = "model_save/demo"  # every stage writes below it; the final model is the folder itself
    python: str = "python"  # "accelerate launch" for GPUs (set by the gpu profile)
    demo_data: bool = True  # write the embedded demo data first
    data_config: str = "data/sources/demo.yaml"
    data_overrides: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=lambda: dict(vocab_size=1024, token_type="char"))
    pretrain_stage: str = "demo_pretrain"
    pretrain: dict = field(default_factory=dict)
    sft_stage: str = "demo_sft"
    # measured on the demo data: SFT from random init answered 2 of 3 held-out questions with two seeds, SFT
    # from the 1-minute demo pretraining 0-1 of 3; the larger profiles start SFT from their pretrained model
    sft_from_pretrain: bool = False
    sft: dict = field(default_factory=lambda: dict(learning_rate=1e-3, max_steps=3000, group_by_length=False))
    dpo: dict = field(default_factory=lambda: dict(epochs=5, learning_rate=1e-4, batch_size_per_gpu=8,
                                                   num_threads=1, save_steps=0))
    dpo_file: str = ""  # '' = the data stage's DPO parquet
    dpo_valid_ratio: float = 0.0  # > 0: split off held-out pairs by prompt (utils/dpo_data_process.py build)
    # the final model is the DPO model (else the SFT model). The demo ships its SFT model: on its 24 toy triples
    # DPO (margin 0 -> 1.55) turned one correct held-out answer wrong, measured; the DPO stage still runs.
    use_dpo_model: bool = False
    ceval_dir: str = "data/demo/ceval"
    ceval_split: str = "val"
    ie_train: str = ""  # '' skips the triple-extraction fine-tune
    ie_dev: str = ""
    ie: dict = field(default_factory=dict)
    heldout: str = "data/demo/heldout.json"
    publish_dir: str = ""  # the report stage also copies report.md + plots here (e.g. docs/report_cpu)
    sample_prompts: tuple = ("你好", "中国的首都是哪里？", "怎样保持健康？", "12加7等于多少？", "把数字25写成中文。")


PIPELINE_PROFILES: dict[str, dict[str, Any]] = {
    "demo": {},
    # Sized from a probe (batch 16 x 128+128 tokens, 1.5 s a step with 2 threads) for about an hour; the full run
    # on 2 idle cores averaged 2.7 s a step and took 96 min in all (docs/report_cpu/report.md). Step counts size
    # it; the data is all of ../shared/data.
    "cpu": dict(
        profile="cpu", root="model_save/cpu", demo_data=False, data_config="data/sources/shared_all.yaml",
        tokenizer=dict(vocab_size=8192, token_type="char"),
        pretrain_stage="pretrain", sft_stage="sft", sft_from_pretrain=True, use_dpo_model=True,
        pretrain=dict(max_steps=1100, batch_size_per_gpu=16, learning_rate=7e-4, warmup_steps=0.05,
                      max_source_len=128, max_target_len=128, num_threads=2, save_steps=250, eval_steps=275,
                      max_eval_samples=256, bleu_samples=16),
        sft=dict(max_steps=550, batch_size_per_gpu=16, learning_rate=3e-4, warmup_steps=0.05,
                 max_source_len=128, max_target_len=128, num_threads=2, save_steps=250, eval_steps=275,
                 max_eval_samples=256, bleu_samples=16),
        dpo=dict(epochs=1, learning_rate=5e-5, beta=0.1, batch_size_per_gpu=8, max_source_len=128,
                 max_target_len=128, num_threads=2, save_steps=0, eval_steps=25),
        dpo_valid_ratio=0.1, heldout="", publish_dir="docs/report_cpu",
        ceval_dir=str(SHARED_DATA / "eval" / "ceval-exam"),
        ie_train=str(SHARED_DATA / "ie" / "duie" / "duie_train_4000.json"),
        ie_dev=str(SHARED_DATA / "ie" / "duie" / "duie_dev.json"),
        ie=dict(time_budget_min=8, eval_limit=300, max_source_len=160, max_target_len=96, max_new_tokens=96,
                num_threads=2, progress=False),
    ),
    "gpu": dict(
        profile="gpu", root="model_save/gpu", demo_data=False, python="accelerate launch --config_file accelerate.yaml",
        data_config="data/sources/shared_all.yaml", tokenizer=dict(vocab_size=29298, token_type="char"),
        pretrain_stage="pretrain", sft_stage="sft", sft_from_pretrain=True, use_dpo_model=True,
        pretrain=dict(preset="base", batch_size_per_gpu=16, gradient_accumulation_steps=8, learning_rate=1e-4,
                      lr_scheduler="onecycle", max_source_len=256, max_target_len=256),
        sft=dict(batch_size_per_gpu=24, gradient_accumulation_steps=4, learning_rate=5e-5),
        dpo_valid_ratio=0.1, heldout="",
        ceval_dir=str(SHARED_DATA / "eval" / "ceval-exam"),
        ie_train=str(SHARED_DATA / "ie" / "duie" / "duie_train.json"),
        ie_dev=str(SHARED_DATA / "ie" / "duie" / "duie_dev.json"),
    ),
}
