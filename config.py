"""Configuration for every stage, as dataclasses with presets.

Every script builds its config with ``make_config(Cls, preset=..., **overrides)`` so that any field can be
overridden from the command line through fire (``--learning_rate=1e-4``). Unknown keys raise a clear error
instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Fixed special tokens (docs/format.md): ids 0..6 in this order.
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

    vocab_size: int = 29298  # embedding rows (follows the tokenizer when a model is built from one)
    d_model: int = 768  # hidden width
    num_layers: int = 10  # encoder blocks
    num_decoder_layers: int = 10  # decoder blocks
    num_heads: int = 12  # attention heads per block
    d_kv: int = 64  # width of each head
    d_ff: int = 3072  # feed-forward inner width
    dropout_rate: float = 0.1  # dropout in every block (0 for short pretraining runs: see docs/recipe.md)
    feed_forward_proj: str = "relu"  # relu (T5 v1.0) | gated-gelu (T5 v1.1)
    relative_attention_num_buckets: int = 32  # T5 relative position buckets
    relative_attention_max_distance: int = 128  # distance beyond which positions share a bucket
    tie_word_embeddings: bool = True  # input embeddings = output layer (T5Config always ties them)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # the reference's T5 (about 0.2B parameters with the 29,298-token vocabulary)
    "base": dict(d_model=768, num_layers=10, num_decoder_layers=10, num_heads=12, d_kv=64, d_ff=3072),
    # past one GPU (docs/training.md "Past one machine"): T5 v1.0's published "large" shape (Raffel et al. 2020),
    # 0.74B parameters with the 29,298-token vocabulary: 3.9x base, the same 64-wide heads and d_ff = 4 d_model, depth
    # doubled rather than width stretched, a shape whose training is documented
    "large": dict(d_model=1024, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64, d_ff=4096),
    # CPU experiments: trains at a few hundred tokens/s on 2 cores
    "small": dict(d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64, d_ff=1536,
                  vocab_size=8192),
    # tests and the demo: seconds per hundred steps on a CPU
    "tiny": dict(d_model=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32, d_ff=512,
                 vocab_size=2048, dropout_rate=0.0),
}


# ------------------------------------------------------------------------------------------ training
# The named choices of the training configs, checked once, when a config is built.
OPTIMIZERS = ("adamw", "adafactor", "sgd")
LR_SCHEDULERS = ("cosine", "onecycle", "constant", "linear")
FREEZE_MODES = ("none", "decoder_only")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def unknown(option: str, value, allowed) -> "ConfigError":
    """The error for a name outside ``allowed`` (optimizer, lr_scheduler, freeze, loss_type)."""
    return ConfigError(f"unknown {option} {value!r}; expected one of {', '.join(allowed)}")


def check_choices(cfg, choices: dict[str, tuple]) -> None:
    for option, allowed in choices.items():
        if getattr(cfg, option) not in allowed:
            raise unknown(option, getattr(cfg, option), allowed)


@dataclass
class LoopConfig:
    """What the one training loop (model/training/engine.py) reads, shared by every stage's config; a stage's
    config inherits these fields and redeclares the ones whose default differs."""

    output_dir: str = "model_save/pretrain"  # final model (plain HF folder), checkpoints/, metrics.jsonl, loss_curve.png
    is_keep_training: bool = False  # continue exactly from the newest checkpoint in output_dir
    epochs: int = 1  # passes over the training files (ignored when max_steps > 0)
    max_steps: int = -1  # optimizer updates; > 0 overrides epochs
    batch_size_per_gpu: int = 16  # samples per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer update
    learning_rate: float = 5e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay on weights (not on norms and biases)
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    optimizer: str = "adamw"  # adamw | adafactor (external LR: the schedule applies) | sgd
    lr_scheduler: str = "cosine"  # cosine | onecycle | constant | linear
    warmup_steps: float = 0.02  # a fraction of total steps when < 1
    min_lr_ratio: float = 0.1  # cosine ends at learning_rate * min_lr_ratio
    div_factor: float = 25.0  # onecycle starts at learning_rate / div_factor
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | fp16 | bf16
    cpu: bool = False  # train on CPU even when a GPU is visible
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    save_steps: int = 1000  # checkpoint every N updates (0: off)
    eval_steps: int = 1000  # evaluate every N updates (0: only at the end)
    logging_steps: int = 20  # log train loss every N updates (0: only at the end)
    keep_last_n: int = 2  # newest checkpoints kept (plus the best one by eval loss, in a stage that picks one)
    save_best: bool = True  # export the best model by eval loss to output_dir/best (plain HF folder)
    seed: int = 23333  # seed of weights, data order and dropout
    log_with: str = "tensorboard"  # tensorboard | none
    show_progress: bool = True  # rich progress bar

    def __post_init__(self):
        check_choices(self, {"optimizer": OPTIMIZERS, "lr_scheduler": LR_SCHEDULERS})


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining (and, with ``is_finetune=True``, SFT) through the project's accelerate trainer.

    ``train_file`` takes one file or several separated by commas, each optionally followed by ``:weight``
    (``corpus.parquet:2,sft.parquet:0.5``): a weight is how many times the file's rows are used per epoch.
    Files are parquet (``prompt``/``response`` or ``text`` columns) or ``.txt`` (one document per line).
    """

    preset: str = "small"  # model shape (MODEL_PRESETS); --stage picks the training settings (TRAIN_PRESETS)
    stage: Optional[str] = None  # the TRAIN_PRESETS entry this config came from (informational)
    train_file: str = "data/generated/all/my_train_dataset.parquet"  # parquet/.txt file(s), comma-separated, each with an optional :weight
    valid_file: Optional[str] = "data/generated/all/my_valid_dataset.parquet"  # held-out pairs for eval loss, bpc and BLEU (None: no eval)
    tokenizer_dir: str = "model_save/tokenizer"  # tokenizer folder for a model trained from scratch
    init_from: Optional[str] = None  # a model folder (or hub id) to start from (SFT: the pretrained model)
    push_to_hub: Optional[str] = None  # a hub repo id: upload the final folder (with its model card) there
    is_finetune: bool = False  # SFT: start from --init_from
    freeze: str = "none"  # none | decoder_only (reference SFT: embeddings and encoder frozen)
    dropout_rate: Optional[float] = None  # overrides the model's dropout (preset or pretrained config)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields over the preset (d_model, ...)
    max_source_len: int = 256  # encoder tokens per sample, [EOS] included (truncated by tokens)
    max_target_len: int = 256  # decoder tokens per sample, [EOS] included
    streaming: bool = False  # read files in record batches through a shuffle buffer instead of loading them
    shuffle_buffer: int = 10000  # samples in the streaming shuffle buffer
    group_by_length: bool = True  # batch pairs of similar length
    length_group_batches: int = 64  # batches sorted together when grouping by length
    pad_to_multiple_of: int = 0  # 8 helps tensor cores on GPU; 0 pads to the batch's longest
    packing: bool = False  # several examples per row (block-diagonal attention): a batch is batch_size full rows
    text_mode: str = "prefix"  # how `text` rows become pairs: prefix | span | denoise | copy | mix (prefix+span); several at a share: prefix:2+copy:1
    copy_max_len: int = 64  # copy rows: tokens per copied window, [EOS] included
    copy_eval_samples: int = 0  # > 0: each eval also copies this many held-out targets (copy loss, exact copy rate)
    noise_density: float = 0.15  # span corruption and denoising: share of tokens masked
    mean_noise_span_length: float = 3.0  # span corruption and denoising: mean masked span
    max_eval_samples: int = 1000  # validation samples used
    eval_max_source_len: int = 0  # 0: the training lengths; fixed lengths keep bpc comparable across runs
    eval_max_target_len: int = 0
    eval_batch_size: int = 32  # samples per eval forward
    bleu_samples: int = 32  # validation prompts answered greedily for char BLEU (0: off)
    baselines: bool = True  # character unigram/bigram bpc of the held-out targets (model/quality.py)
    num_workers: int = 0  # DataLoader workers of the Seq2SeqTrainer path (pre_train.py, sft_train.py)

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, {"freeze": FREEZE_MODES})


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "sft": dict(is_finetune=True, learning_rate=1e-4, output_dir="model_save/sft",
                train_file="data/generated/all/my_train_dataset.parquet", freeze="none",
                init_from="model_save/pretrain"),
    # `make demo`: the tiny model on the embedded demo data. Measured (docs/training.md "SFT"): with every fact in
    # several templates (utils/demo_data.py), SFT from random init at lr 1e-3 for 3,000 steps (the pipeline's flags)
    # answered 3 of 3 held-out questions with seeds 1-3, at 2e-3 0 of 3. The demo's SFT does not start from this
    # pretraining (PipelineConfig.sft_from_pretrain): 500 steps are enough for the report card's figures.
    "demo_pretrain": dict(preset="tiny", train_file="data/demo/corpus.txt", valid_file="data/demo/sft_valid.parquet",
                          tokenizer_dir="model_save/demo/tokenizer", output_dir="model_save/demo/pretrain",
                          text_mode="prefix", batch_size_per_gpu=32, learning_rate=1e-3, lr_scheduler="onecycle",
                          warmup_steps=0.1, dropout_rate=0.1, max_steps=500, max_source_len=64, max_target_len=64,
                          save_steps=100000, eval_steps=100000, bleu_samples=8, num_threads=1, log_with="none"),
    "demo_sft": dict(preset="tiny", is_finetune=True, train_file="data/demo/sft.parquet",
                     valid_file="data/demo/sft_valid.parquet", init_from="model_save/demo/pretrain",
                     output_dir="model_save/demo/sft", batch_size_per_gpu=32, learning_rate=1e-3,
                     lr_scheduler="onecycle", warmup_steps=0.1, dropout_rate=0.1, max_steps=2000, max_source_len=64,
                     max_target_len=64, save_steps=100000, eval_steps=100000, bleu_samples=8, num_threads=1,
                     log_with="none"),
    # the triple-extraction fine-tune (finetune_examples/info_extract/finetune.py); intervals of 0 are off
    "ie": dict(epochs=3, batch_size_per_gpu=16, learning_rate=5e-4, lr_scheduler="cosine", warmup_steps=0.05,
               max_source_len=192, max_target_len=128, save_steps=0, eval_steps=0, logging_steps=20,
               bleu_samples=0, log_with="none", num_threads=2, cpu=False),
}


DEFAULT_MAX_PIECES = 1_000_000  # count-table cap: bounds memory whatever the corpus size
DEFAULT_CHUNK_CHARS = 8  # longer pieces (CJK runs) are counted as chunks of this many characters
DEFAULT_FEED_PIECES = 5_000_000  # at most this many weighted pieces are fed to the BPE trainer


# ----------------------------------------------------------------------------------------- tokenizer
@dataclass
class TokenizerTrainConfig:
    """Options of ``train_tokenizer.py`` (every field is a command-line flag)."""

    inputs: Optional[str] = None  # text files, globs, folders, .jsonl or .parquet, comma-separated
    columns: Optional[str] = None  # parquet columns / jsonl fields (comma-separated); default: text columns
    output_dir: str = "model_save/tokenizer"  # tokenizer.json, tokenizer_config.json, training_stats.json
    token_type: str = "char"  # char | byte
    vocab_size: int = 29298  # size of the vocabulary, special tokens and sentinels included
    num_sentinels: int = DEFAULT_NUM_SENTINELS  # span-corruption sentinels <extra_id_i>, ids from 7
    min_frequency: int = 2  # pieces seen fewer times are not merged
    sentencepiece: Optional[str] = None  # None | bpe | unigram (char level only)
    character_coverage: float = 0.9995  # sentencepiece only
    num_proc: int = 0  # counting processes; 0 = one per CPU (at most 8)
    max_pieces: int = DEFAULT_MAX_PIECES  # count-table cap: bounds memory whatever the corpus size
    chunk_chars: int = DEFAULT_CHUNK_CHARS  # longer pieces (CJK runs) are counted in chunks of this many chars
    feed_pieces: int = DEFAULT_FEED_PIECES  # most weighted pieces fed to the BPE trainer
    seed: int = 0  # thinning of the count table and sentencepiece sampling
    show_progress: bool = True  # progress bars


TOKENIZER_PRESETS = {
    "default": {},
    # the demo corpus (40 kB): a small vocabulary for the tiny model, trained in seconds
    "demo": dict(inputs="data/demo/corpus.txt", vocab_size=2048, output_dir="model_save/demo/tokenizer",
                 num_proc=1, show_progress=False),
}


# ------------------------------------------------------------------------------------------ C-Eval
@dataclass
class CEvalConfig:
    """Options of the harness; every field can be overridden on the command line (``--k_shot=5``)."""

    model_dir: str = "model_save/sft"  # the model folder (or hub id) to evaluate
    data_dir: str = str(SHARED_DATA / "eval" / "ceval-exam")  # <split>/<subject>_<split>.csv files
    split: str = "val"  # val | test | dev
    subjects: Optional[Any] = None  # a comma-separated subset (or a list); None = every CSV of the split
    k_shot: int = 0  # examples from the dev split put before each question
    mode: str = "logits"  # logits | generate
    header: bool = True  # the C-Eval instruction line naming the subject
    batch_size: int = 16  # questions scored at once
    max_source_len: int = 512  # prompt tokens (with [EOS]); shots are dropped first, then the prompt's head
    max_new_tokens: int = 16  # generate mode only
    out_dir: Optional[str] = "model_save/eval/ceval"  # None: print only
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 2  # torch CPU threads
    show_table: bool = True  # print the per-subject table



@dataclass
class DedupSettings:
    """Duplicate removal in the data stage (``--dedup.<field>=...``)."""

    exact: bool = True  # drop rows whose normalised text was seen before
    near: bool = True  # drop near-duplicates (MinHash LSH over character n-grams)
    threshold: float = 0.85  # estimated Jaccard similarity at which two rows count as near-duplicates
    num_perm: int = 128  # MinHash permutations (more: a finer similarity estimate, slower)
    ngram: int = 3  # characters per shingle
    workers: int = 1  # processes that compute signatures
    batch_size: int = 2048  # rows per signature batch


@dataclass
class CorpusSettings:
    """The plain-text corpus the tokenizer trains on (``--corpus.<field>=...``)."""

    roles: list = field(default_factory=lambda: ["pretrain", "sft"])  # source roles whose text goes in
    newline: str = "space"  # newlines inside a row: space | escape | paragraphs


@dataclass
class SourceDefaults:
    """What every source of the data stage's YAML gets unless it says otherwise (``--source_defaults.<field>``)."""

    encoding: str = "utf-8"  # text encoding of the source files
    max_row_bytes: int = 1 << 20  # a longer row is dropped and counted (a broken file, not a document)
    clean: dict = field(default_factory=dict)  # cleaning options (utils/cleaning.py CleanOptions)
    min_chars: int = 5  # prose rows shorter than this are dropped
    max_chars: int = 2000  # prose rows longer than this are dropped
    chunk_chars: int = 1000  # long prose is cut at paragraph, then sentence boundaries into rows of at most this
    prompt_min_chars: int = 2  # pairs with a shorter prompt are dropped
    prompt_max_chars: int = 1024  # pairs with a longer prompt are dropped
    response_min_chars: int = 2  # pairs with a shorter response are dropped
    response_max_chars: int = 2048  # pairs with a longer response are dropped
    pairs: str = "auto"  # how prose becomes prompt/response pairs: auto | title | none
    pair_min_prompt_chars: int = 4  # a pair made from prose needs at least this much prompt ...
    pair_min_response_chars: int = 8  # ... and response
    title_templates: list = field(default_factory=lambda: ["{title}"])  # prompts made from a title
    optional: bool = False  # a missing optional source is reported and skipped, not an error
    near_dedup: bool = True  # this source takes part in near-duplicate removal
    exact_dedup: bool = True  # ... and in exact-duplicate removal
    multi_turn: str = "last"  # conversations: last (the last assistant turn) | per_turn (a row per turn)


@dataclass
class DataStageConfig:
    """The data stage (utils/raw_data_process.py): the settings around the YAML's list of sources, which is data.

    Any field is a flag (``--seed=1``), nested ones dotted (``--dedup.workers=2``); the YAML file may set them too.
    """

    data_root: str = "../shared/data"  # where the sources' relative paths start
    seed: int = 23333  # shuffling, splits and samples
    splits: dict = field(default_factory=lambda: {"train": 0.90, "valid": 0.02, "test": 0.08})  # shares of the pairs
    shuffle: bool = True  # shuffle the split files (bucketed on disk, bounded memory)
    shuffle_buckets: int = 64  # on-disk buckets of the shuffle
    splits_roles: list = field(default_factory=lambda: ["sft", "pretrain"])  # roles whose rows go to the splits
    prose_pairs: bool = True  # pretraining prose also yields prompt/response pairs (title -> text ...)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)  # the tokenizer's corpus (--corpus.<field>)
    dedup: DedupSettings = field(default_factory=DedupSettings)  # duplicate removal (--dedup.<field>)
    max_rows_per_source: Optional[int] = None  # a cap per source (quick runs); None reads everything
    log_examples: int = 5  # dropped rows shown per reason in the log
    samples: int = 50  # kept rows sampled into the report
    progress: bool = True  # progress bars
    source_defaults: SourceDefaults = field(default_factory=SourceDefaults)  # per source unless it says otherwise


def data_stage_defaults() -> dict[str, Any]:
    """The data stage's defaults as the nested dict it merges the YAML file and the flags into."""
    return dataclasses.asdict(DataStageConfig())


def data_stage_help() -> str:
    """``--help`` of the data stage: its fields, then the nested ones (set as ``--dedup.workers=2``)."""
    nested = {"dedup": DedupSettings, "corpus": CorpusSettings, "source_defaults": SourceDefaults}
    parts = [config_help(DataStageConfig)]
    parts += [config_help(c).replace("\n  --", f"\n  --{name}.") for name, c in nested.items()]
    return "\n\n".join(parts)


@dataclass
class DPOConfig(LoopConfig):
    """Preference optimisation (DPO/IPO) of the SFT model, full or LoRA (model/training/dpo.py, dpo_train.py)."""

    sft_model_dir: str = "model_save/sft"  # the policy to start from (a plain model folder or a hub id)
    push_to_hub: Optional[str] = None  # a hub repo id: upload the final folder (with its model card) there
    ref_model_dir: Optional[str] = None  # the reference policy; default: the SFT model itself
    train_file: str = "data/generated/dpo/my_dpo_train.parquet"  # parquet with prompt, chosen, rejected
    valid_file: Optional[str] = None  # held-out pairs (build writes my_dpo_valid.parquet); None: train_file
    output_dir: str = "model_save/dpo"  # final model, checkpoints, metrics.jsonl
    loss_type: str = "sigmoid"  # sigmoid | ipo
    beta: float = 0.1  # strength of the pull towards the reference policy
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    use_lora: bool = False  # train a LoRA adapter instead of every weight
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale (alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_target_modules: tuple = ("q", "k", "v", "o")  # T5 attention projections; "q,k,v,o,wi,wo" adds the FFN
    merge_lora: bool = True  # after LoRA training also write a merged plain folder to output_dir/merged
    precompute_ref_logps: bool = True  # one reference pass before training; no reference model in memory
    batch_size_per_gpu: int = 8  # pairs per process per micro-step
    learning_rate: float = 5e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: float = 0.1  # a fraction of total steps when < 1
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate * min_lr_ratio
    max_source_len: int = 256  # encoder tokens per sample, [EOS] included (truncated by tokens)
    max_target_len: int = 256  # decoder tokens per sample, [EOS] included
    group_by_length: bool = True  # batch pairs of similar length
    save_steps: int = 500  # 0: no checkpoints
    save_best: bool = False  # (DPO picks no best model: the final one is the result)
    eval_steps: int = 100  # evaluate on the held-out pairs every N updates (0: only at the end)
    logging_steps: int = 10  # log every N updates (0: only at the end)

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, {"loss_type": DPO_LOSS_TYPES})


@dataclass
class PlanConfig:
    """The memory plan of a model preset on data-parallel GPUs (``python train.py plan``): parameters, gradients and
    optimizer states counted, activations measured on this CPU at batch 1 and scaled (model/training/memory_plan.py)."""

    preset: str = "base"  # model preset (MODEL_PRESETS)
    vocab_size: int = 29298  # embedding rows (the gpu profile's tokenizer)
    batch_size_per_gpu: int = 16  # samples per GPU per micro-step (the gpu profile's pretraining)
    max_source_len: int = 256  # encoder tokens per sample
    max_target_len: int = 256  # decoder tokens per sample
    gpus: tuple = (1, 2, 8, 16)  # data-parallel world sizes in the table
    gpu_gb: tuple = (24, 40, 80)  # GPU memory sizes judged (GB)
    usable_share: float = 0.9  # share of a GPU's memory a plan may fill (CUDA context, allocator fragmentation)
    measure_lens: tuple = (32, 64)  # source = target lengths of the two batch-1 CPU measurements of activations
    zero2_config: str = "configs/deepspeed_zero2.json"  # its reduce bucket is counted under ZeRO-2
    num_threads: int = 0  # torch CPU threads for the measurement; 0 keeps torch's default


@dataclass
class InferConfig:
    """Chat settings of cli_demo.py, api_demo.py and ChatBot (unset decoding defaults come from the model folder)."""

    model_dir: str = "model_save/sft"  # a model folder (plain HF T5)
    search_type: str = "greedy"  # greedy | beam | sampling | contrastive
    # None: the model folder's generation_config.json (written by training; see GENERATION_DEFAULTS)
    max_new_tokens: Optional[int] = None  # answer length limit
    max_prompt_tokens: int = 512  # encoder tokens for system + history + query
    history_tokens: int = 384  # of which at most this many for earlier turns (oldest dropped first)
    num_beams: int = 4  # beam search width
    temperature: float = 0.9  # sampling temperature
    top_k: int = 50  # sampling: keep the k likeliest tokens
    top_p: float = 0.95  # sampling: nucleus mass
    repetition_penalty: Optional[float] = None  # > 1 discourages tokens already generated
    no_repeat_ngram_size: Optional[int] = None  # no n-gram of this size twice in an answer (0: off)
    penalty_alpha: float = 0.6  # contrastive search: degeneration penalty
    contrastive_top_k: int = 4  # contrastive search: candidates per step
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    engine: str = "torch"  # torch | ct2
    # API server
    host: str = "127.0.0.1"  # API: address to listen on
    port: int = 8812  # API: port
    api_key: Optional[str] = None  # or env CHATLM_API_KEY; None means no auth
    max_body_bytes: int = 64 * 1024  # API: larger request bodies get 413
    max_concurrency: int = 16  # API: requests decoded at once (in one shared batch, or worker threads)
    max_queue: int = 16  # API: requests waiting beyond that get 503
    batching: bool = True  # API: greedy/sampling requests share each decoder step (torch engine); False: one per thread
    max_n: int = 4  # API: most choices (n) one request may ask for
    cors_origins: Any = None  # API: browser origins allowed to call it, comma-separated ("*": any); None: no CORS
    model_name: Optional[str] = None  # the id /v1/models reports; default: the model folder's name
    torch_threads: int = 0  # 0 leaves torch's default
    stream_interval_s: float = 0.02  # streamed pieces closer than this are sent together (fewer thread wake-ups)
    # CTranslate2 (--engine ct2): converted once into ct2_dir (default <model_dir>/ct2), int8 on CPU
    ct2_compute_type: str = "auto"  # auto (int8 on CPU, int8_float16 on GPU) | int8 | float32 | ...
    ct2_dir: Optional[str] = None  # CTranslate2 model folder (default <model_dir>/ct2)


# Chat defaults saved in every model folder's generation_config.json: small models loop ("我我我...") under
# plain greedy decoding; a mild penalty and a 4-gram block stop that without changing a short answer.
GENERATION_DEFAULTS = dict(max_new_tokens=256, repetition_penalty=1.15, no_repeat_ngram_size=4)


# `--dry_run`: the same stages, launcher and settings, shrunk to a few steps and a narrow model, so a profile
# meets its first GPU already tested. On a machine without GPUs it runs 2 processes on the CPU (gloo).
DRY_RUN_MODEL = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32)
DRY_RUN_TRAIN = dict(max_steps=4, save_steps=2, eval_steps=2, logging_steps=1, max_eval_samples=16, bleu_samples=2,
                     model_overrides=DRY_RUN_MODEL, show_progress=False)


# `--dry_run=shapes`: the profile's real model width and depth, vocabulary and sequence lengths, 2 updates at batch
# 2 in one CPU process (one GPU's share), so the first GPU run meets no shape, vocabulary or memory surprise.
SHAPES_LOOP = dict(max_steps=2, batch_size_per_gpu=2, gradient_accumulation_steps=1, save_steps=2, eval_steps=2,
                   logging_steps=1, num_threads=2, cpu=True)
SHAPES_TRAIN = dict(SHAPES_LOOP, max_eval_samples=2, eval_batch_size=2, bleu_samples=1)


def _trim(d: dict, drop=()) -> dict:
    return {k: v for k, v in d.items() if k not in drop}


def dry_run_profile(cfg: "PipelineConfig", mode: Any = True) -> dict:
    """Overrides that shrink a profile to minutes on a CPU while keeping its stages, launcher and settings
    (``mode`` True), or its real shapes (``"shapes"``, ``shapes_profile``)."""
    if mode == "shapes":
        return shapes_profile(cfg)
    if mode is not True:
        raise ConfigError(f"--dry_run expects True or shapes, got {mode!r}")
    return dict(
        root=cfg.root.rstrip("/") + "_dry_run", publish_dir="",
        data_overrides=dict(cfg.data_overrides, max_rows_per_source=60),
        tokenizer=dict(cfg.tokenizer, vocab_size=1024),
        pretrain=dict(_trim(cfg.pretrain, ("epochs",)), **DRY_RUN_TRAIN),
        sft=dict(_trim(cfg.sft, ("epochs",)), **{k: v for k, v in DRY_RUN_TRAIN.items() if k != "model_overrides"}),
        dpo=dict(_trim(cfg.dpo, ("epochs",)), max_steps=2, eval_steps=1, save_steps=1, batch_size_per_gpu=1,
                 show_progress=False),
        ceval=dict(cfg.ceval, subjects="computer_network,high_school_physics"),
        ie=dict(_trim(cfg.ie, ("time_budget_min",)), max_steps=3, eval_limit=6, progress=False),
        sample_prompts=cfg.sample_prompts[:2],
    )


def _full_batches(stage: dict) -> dict:
    """Pads every batch to the stage's longest sequence length, so its memory is measured at full-length batches
    (a few short rows would otherwise hide the peak)."""
    return dict(pad_to_multiple_of=max(stage.get("max_source_len", TrainConfig.max_source_len),
                                       stage.get("max_target_len", TrainConfig.max_target_len)))


def shapes_profile(cfg: "PipelineConfig") -> dict:
    """Overrides that keep the profile's model shape, tokenizer vocabulary size and every stage's sequence lengths
    but run 2 updates at batch 2 per training stage, in one process on the CPU, on 40 rows per data source;
    pretraining and SFT batches are padded to the full lengths.

    40 rows keep the DPO reference pass (it scores every pair) short at the base width; the tokenizer merges
    pieces seen once (min_frequency 1) so that the small corpus still fills the real vocabulary. The IE run
    from random init is skipped: it has the pretrained run's shape.
    """
    return dict(
        root=cfg.root.rstrip("/") + "_dry_run_shapes", publish_dir="", python="python", ie_scratch=False,
        data_overrides=dict(cfg.data_overrides, max_rows_per_source=40),
        tokenizer=dict(cfg.tokenizer, min_frequency=1),
        copy_warmup=(dict(_trim(cfg.copy_warmup, ("epochs",)), **SHAPES_TRAIN, **_full_batches(cfg.copy_warmup))
                     if cfg.copy_warmup else {}),
        pretrain=dict(_trim(cfg.pretrain, ("epochs",)), **SHAPES_TRAIN, **_full_batches(cfg.pretrain),
                      show_progress=False),
        sft=dict(_trim(cfg.sft, ("epochs",)), **SHAPES_TRAIN, **_full_batches(cfg.sft), show_progress=False),
        dpo=dict(_trim(cfg.dpo, ("epochs",)), **SHAPES_LOOP, show_progress=False),
        ceval=dict(cfg.ceval, subjects="middle_school_geography", device="cpu", num_threads=2),
        ie=dict(_trim(cfg.ie, ("time_budget_min",)), max_steps=2, batch_size_per_gpu=2, max_eval_samples=2,
                eval_limit=2, eval_batch_size=2, num_threads=2, cpu=True, progress=False),
        decoding_prompts=min(cfg.decoding_prompts, 2), sample_prompts=cfg.sample_prompts[:2],
    )


# ----------------------------------------------------------------------------------------- helpers
class ConfigError(ValueError):
    """A bad option on the command line or in a config file (unknown name, wrong type, unknown preset)."""


def make_config(cls, preset: Optional[str] = None, presets: Optional[dict] = None, /, **overrides):
    """Build ``cls`` from a named preset, a ``config`` file of fields, then flags (each wins over the one before).

    Unknown keys are an error naming the valid ones; values are checked against the field types (fire turns
    ``--api_key=123456`` into an int: a string field gets the string back); ``help`` prints every field with its
    type, default and meaning, then exits.
    """
    if overrides.get("help") is True or overrides.get("h") is True:
        print(config_help(cls, presets))
        raise SystemExit(0)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if preset is not None:
        if presets is None or preset not in presets:
            known = ", ".join(sorted(presets or {}))
            raise ConfigError(f"unknown preset {preset!r} for {cls.__name__}; known presets: {known}")
        values.update(presets[preset])
    if "config" in overrides and "config" not in names:
        values.update(_read_config_file(overrides.pop("config")))
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; "
                         f"valid options: {', '.join(sorted(names))} (--help lists them with their meaning)")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _check_type(cls.__name__, k, v, hints[k]) for k, v in values.items()})


def _read_config_file(path) -> dict:
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"--config {p}: no such file")
    import yaml
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _check_type(owner: str, name: str, value: Any, hint) -> Any:
    """The value as the field's type where the conversion is lossless; a clear error otherwise."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional or hint is Any:
            return None
        raise ConfigError(f"{owner}.{name} cannot be None (expected {getattr(base, '__name__', base)})")
    origin = typing.get_origin(base) or base
    bad = ConfigError(f"{owner}.{name} expects {getattr(origin, '__name__', origin)}, got {value!r} "
                     f"({type(value).__name__})")
    if base is Any or origin is typing.Union:
        return value
    if origin is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad
        return value if isinstance(value, str) else str(value)
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if origin in (dict, tuple, list):
        if origin is tuple and isinstance(value, (list, str)):
            return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
        if not isinstance(value, origin):
            raise bad
    return value


def _field_comments(cls) -> dict[str, str]:
    """``name: type = default  # meaning`` -> {name: meaning}, read from the source of the class and its bases."""
    import inspect
    import re
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a base's comments first: the subclass's own win
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        notes.update({m.group(1): m.group(2).strip()
                      for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M)})
    return notes


def config_help(cls, presets: Optional[dict] = None) -> str:
    """Every field of ``cls``: name, type, default and the comment that explains it."""
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__
    lines = [f"{cls.__name__}: {doc}", "", "Options (--name=value; --config=file.yaml loads fields, flags win):"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        if type(None) in typing.get_args(hints[f.name]) and len(args) == 1:
            t = f"{getattr(args[0], '__name__', args[0])} | None"
        else:
            t = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  --{f.name:<26s} {t:<16s} default {default!r}" + (f"  {notes[f.name]}" if f.name in notes else ""))
    if presets:
        lines += ["", f"Presets: {', '.join(presets)}"]
    return "\n".join(lines)


def run_cli(main, default: str = "", **commands) -> None:
    """The command line of every top-level script: flags run ``main`` (``python train.py --max_steps=10``); a
    first word naming one of ``commands`` runs that one instead (``python dpo_train.py merge ...``). The word
    ``default`` before the flags is accepted too (``python train.py train ...``)."""
    import sys

    import fire
    args = sys.argv[1:]
    if args and args[0] in commands:
        fire.Fire(commands[args[0]], args[1:], name=args[0])
        return
    if default and args and args[0] == default:
        args = args[1:]
    if commands and ("--help" in args or "-h" in args):
        for name, fn in commands.items():
            print(f"{Path(sys.argv[0]).name} {name} ...: {(fn.__doc__ or '').strip().splitlines()[0]}")
        print()
    try:
        fire.Fire(main, args, name=Path(sys.argv[0]).name)
    except ConfigError as e:  # a user's typo: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def model_config(preset: str = "small", **overrides) -> ModelConfig:
    return make_config(ModelConfig, preset, MODEL_PRESETS, **overrides)


def asdict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------ pipeline
@dataclass
class PipelineConfig:
    """One config from raw data to a chat model (pipeline.py); each stage's own config takes the overrides."""

    profile: str = "demo"  # the PIPELINE_PROFILES entry
    root: str = "model_save/demo"  # every stage writes below it; the final model is the folder itself
    python: str = "python"  # "accelerate launch" for GPUs (set by the gpu profile)
    demo_data: bool = True  # write the embedded demo data first
    data_config: str = "data/sources/demo.yaml"  # the data stage config (sources, cleaning, dedup)
    data_overrides: dict = field(default_factory=dict)  # more data stage flags (e.g. max_rows_per_source)
    tokenizer: dict = field(default_factory=lambda: dict(vocab_size=1024, token_type="char"))  # train_tokenizer.py flags
    pretrain_stage: str = "demo_pretrain"  # TRAIN_PRESETS entry of the pretraining stage
    pretrain: dict = field(default_factory=dict)  # train.py flags of the pretraining stage
    # non-empty: a copy warm-up stage before pretraining (train.py flags over the pretraining shape; text rows
    # written out again, --text_mode=copy), from which pretraining continues (docs/recipe.md "Copying")
    copy_warmup: dict = field(default_factory=dict)
    sft_stage: str = "demo_sft"  # TRAIN_PRESETS entry of the SFT stage
    # measured on the earlier demo data: SFT from random init answered 2 of 3 held-out questions with two seeds, SFT
    # from the 1-minute demo pretraining 0-1 of 3; the larger profiles start SFT from their pretrained model
    sft_from_pretrain: bool = False  # SFT starts from the pretrained model (else from random init)
    # demo SFT: validated on data/demo/sft_valid.parquet, pairs never trained on (the data stage's split of the
    # same SFT file overlaps the training set)
    sft: dict = field(default_factory=lambda: dict(learning_rate=1e-3, max_steps=3000, group_by_length=False,
                                                   valid_file="data/demo/sft_valid.parquet"))  # train.py flags of the SFT stage
    dpo: dict = field(default_factory=lambda: dict(epochs=5, learning_rate=1e-4, batch_size_per_gpu=8,
                                                   num_threads=1, save_steps=0))
    dpo_file: str = ""  # '' = the data stage's DPO parquet
    dpo_valid_ratio: float = 0.0  # > 0: split off held-out pairs by prompt (utils/dpo_data_process.py build)
    # the final model is the DPO model (else the SFT model). The demo ships its SFT model: on its 24 toy triples
    # DPO (margin 0 -> 1.55) turned one correct held-out answer wrong, measured; the DPO stage still runs.
    use_dpo_model: bool = False  # the final model is the DPO model (else the SFT model)
    push_to_hub: Optional[str] = None  # a hub repo id: the final stage uploads the final folder there
    ceval_dir: str = "data/demo/ceval"  # C-Eval-shaped CSV folder
    ceval_split: str = "val"  # dev | val | test
    ceval: dict = field(default_factory=dict)  # more eval/c_eval.py flags (subjects, batch_size, ...)
    seed: Optional[int] = None  # training seed of every stage (None: each stage's default)
    dry_run: Any = False  # True: a few steps per stage, a narrow model; shapes: the real shapes, 2 updates per stage
    ie_train: str = ""  # '' skips the triple-extraction fine-tune
    ie_dev: str = ""  # triple-extraction dev file (never trained on)
    ie: dict = field(default_factory=dict)  # finetune.py flags of the IE stage
    ie_scratch: bool = True  # also fine-tune IE from random init with the same budget (the value of pretraining)
    # run the two IE fine-tunes side by side (give each ie.num_threads=1 on 2 cores): the same wall clock buys each
    # run more updates than one after the other (docs/recipe.md "Triple extraction")
    ie_parallel: bool = False
    # > 0: the final stage picks the folder's decoding defaults (eval/decoding.py) on this many held-out prompts of
    # the data stage's valid split, so the sample chats are judged on prompts the choice never saw
    decoding_prompts: int = 0
    heldout: str = "data/demo/heldout.json"
    passage_file: str = ""  # SQuAD-style file held out of training: questions answered from a given passage
    passage_questions: int = 0  # how many of its questions the chat stage asks (0: none)
    publish_dir: str = ""  # the report stage also copies report.md + plots here (e.g. docs/report_cpu)
    sample_prompts: tuple = ("你好", "中国的首都是哪里？", "怎样保持健康？", "12加7等于多少？", "把数字25写成中文。",
                             "请介绍一下长城。", "写一句关于春天的诗。", "失眠怎么办？")


# The `cpu` profile's model (the study's `tiny_heads_8`): d_model 128, 2+2 layers, 8 heads of 16, ~2M parameters with
# 8,192 tokens. 8 heads match 4x32 in held-out bpc at equal time; both cross the copy transition at the same update
# on natural text (bench/bench_copy.py).
CPU_MODEL = dict(d_model=128, num_layers=2, num_decoder_layers=2, num_heads=8, d_kv=16, d_ff=512)

# Both DuIE training files of ../shared/data (8,398 sentences); the dev file is never trained on.
DUIE_TRAIN = f'{SHARED_DATA / "ie" / "duie" / "duie_train.json"},{SHARED_DATA / "ie" / "duie" / "duie_train_4000.json"}'

PIPELINE_PROFILES: dict[str, dict[str, Any]] = {
    "demo": {},
    # Rebuilt from the recipe study (docs/recipe.md): at a CPU-hour's compute the best held-out bpc comes from a
    # ~2M-parameter model that sees many tokens (the 42M model saw 1.4M tokens in 50 minutes), at a high learning
    # rate, dropout 0, the prefix objective. Sized by step counts for about an hour on 2 cores.
    "cpu": dict(
        profile="cpu", root="model_save/cpu", demo_data=False, data_config="data/sources/shared_all.yaml",
        tokenizer=dict(vocab_size=8192, token_type="char"),
        pretrain_stage="pretrain", sft_stage="sft", sft_from_pretrain=True, use_dpo_model=True,
        # copying first (docs/recipe.md "Copying"): mixed into pretraining alone (prefix:1+copy:1, 4,000 updates)
        # it did not cross within those cosine-decayed updates; on its own it crosses after about 2,000 updates at a
        # steady 2e-3
        copy_warmup=dict(max_steps=3000, batch_size_per_gpu=16, learning_rate=2e-3, lr_scheduler="constant",
                         warmup_steps=200, max_source_len=128, max_target_len=128, copy_max_len=64, save_steps=1000,
                         eval_steps=250, max_eval_samples=512, copy_eval_samples=128, bleu_samples=0),
        pretrain=dict(preset="small", model_overrides=CPU_MODEL, dropout_rate=0.0, max_steps=6000,
                      batch_size_per_gpu=16, learning_rate=3e-3, warmup_steps=0.02, max_source_len=128,
                      max_target_len=128, num_threads=2, save_steps=1000, eval_steps=500, max_eval_samples=512,
                      bleu_samples=0, text_mode="prefix:2+copy:1", copy_eval_samples=128),
        sft=dict(max_steps=3500, batch_size_per_gpu=16, learning_rate=1e-3, warmup_steps=0.02, dropout_rate=0.0,
                 max_source_len=128, max_target_len=128, num_threads=2, save_steps=1000, eval_steps=700,
                 max_eval_samples=512, bleu_samples=16, copy_eval_samples=128),
        dpo=dict(epochs=1, learning_rate=1e-4, beta=0.1, batch_size_per_gpu=8, max_source_len=128,
                 max_target_len=128, num_threads=2, save_steps=0, eval_steps=25),
        dpo_valid_ratio=0.1, heldout="", publish_dir="docs/report_cpu", decoding_prompts=64,
        passage_file=str(SHARED_DATA / "pretrain" / "cmrc2018-wiki" / "cmrc2018_dev.json"), passage_questions=32,
        ceval_dir=str(SHARED_DATA / "eval" / "ceval-exam"),
        ie_train=DUIE_TRAIN,
        ie_dev=str(SHARED_DATA / "ie" / "duie" / "duie_dev.json"),
        # extraction: the two fine-tunes side by side, 38 minutes each on one thread (1.4x the updates of 2 threads
        # one after the other); 4 entity-swapped copies of every training sentence (the model must copy the names
        # rather than recall them), responses in sentence order, decoding constrained to sentence spans and known
        # predicates (docs/eval.md)
        ie=dict(time_budget_min=38, eval_limit=300, max_source_len=160, max_target_len=96, max_new_tokens=96,
                learning_rate=1e-3, warmup_steps=100, curve_points=6, num_threads=1, progress=False,
                augment_copies=4, sentence_order=True, constrained=True),
        ie_parallel=True,
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
        ie_train=DUIE_TRAIN,
        ie_dev=str(SHARED_DATA / "ie" / "duie" / "duie_dev.json"),
    ),
}
