"""The project's fast tokenizer: build, train, save, load.

One code path for every tokenizer the kit makes. Contract (DESIGN.md): the 7 special tokens sit at ids 0..6,
span-corruption sentinels ``<extra_id_i>`` follow from id 7, and the post-processor appends ``[EOS]`` once to
every encoded text, so callers never add it themselves.

Two kinds, as in the reference project:
* ``char``: BPE over characters with the Metaspace scheme (spaces become ``▁``), byte fallback so that no
  UTF-8 input ever becomes ``[UNK]``;
* ``byte``: byte-level BPE (GPT-2 style), which cannot produce ``[UNK]`` either.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from config import DEFAULT_NUM_SENTINELS, EOS_ID, SPECIAL_TOKENS, sentinel_token

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
TOKEN_TYPES = ("char", "byte")


def special_tokens(num_sentinels: int = DEFAULT_NUM_SENTINELS) -> list[str]:
    """Tokens that must occupy the first ids, in order."""
    return SPECIAL_TOKENS + [sentinel_token(i) for i in range(num_sentinels)]


def pre_tokenizer(token_type: str):
    """Pre-tokenisation shared by training and encoding (digits split so arithmetic is learnable)."""
    if token_type == "char":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ])
    if token_type == "byte":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    raise ValueError(f"unknown token_type {token_type!r}; expected one of {TOKEN_TYPES}")


def new_bpe_tokenizer(token_type: str) -> Tokenizer:
    """An untrained tokenizer with the project's pipeline (normaliser, pre-tokeniser, decoder)."""
    if token_type == "char":
        tok = Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif token_type == "byte":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.decoder = decoders.ByteLevel()
    else:
        raise ValueError(f"unknown token_type {token_type!r}; expected one of {TOKEN_TYPES}")
    # Only NFC: NFKC would turn full-width Chinese punctuation into ASCII and break round trips.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer(token_type)
    return tok


def bpe_trainer(token_type: str, vocab_size: int, num_sentinels: int, min_frequency: int = 2,
                show_progress: bool = False):
    reserved = len(special_tokens(num_sentinels)) + (len(BYTE_TOKENS) if token_type == "char" else 0)
    if vocab_size <= reserved + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: {reserved} ids are reserved for special, "
                         f"sentinel and byte tokens")
    if token_type == "char":
        # The byte-fallback tokens are appended after training, so leave room for them.
        return trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), min_frequency=min_frequency,
                                   special_tokens=special_tokens(num_sentinels), show_progress=show_progress,
                                   initial_alphabet=["\n", "\t"])
    return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=special_tokens(num_sentinels), show_progress=show_progress,
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def add_byte_fallback_tokens(tok: Tokenizer) -> Tokenizer:
    """Append ``<0xNN>`` tokens to a char-level BPE vocabulary so unseen characters fall back to bytes."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for t in BYTE_TOKENS:
        if t not in vocab:
            vocab[t] = len(vocab)
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def finalize(tok: Tokenizer, token_type: str, num_sentinels: int) -> PreTrainedTokenizerFast:
    """Check the fixed ids, install the ``[EOS]`` post-processor and wrap for transformers."""
    if token_type == "char":
        tok = add_byte_fallback_tokens(tok)
    for i, t in enumerate(special_tokens(num_sentinels)):
        got = tok.token_to_id(t)
        if got != i:
            raise ValueError(f"special token {t!r} must have id {i}, got {got}")
    tok.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", pair="$A [EOS] $B:1 [EOS]:1", special_tokens=[("[EOS]", EOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", sep_token="[SEP]", bos_token="[BOS]",
        cls_token="[CLS]", mask_token="[MASK]", unk_token="[UNK]",
        additional_special_tokens=[sentinel_token(i) for i in range(num_sentinels)],
        model_max_length=1_000_000, padding_side="right", clean_up_tokenization_spaces=False)
    fast.init_kwargs["token_type"] = token_type
    fast.init_kwargs["num_sentinels"] = num_sentinels
    return fast


def train_tokenizer(texts: Iterable[str], vocab_size: int = 29298, token_type: str = "char",
                    num_sentinels: int = DEFAULT_NUM_SENTINELS, min_frequency: int = 2,
                    length: Optional[int] = None, show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Train on an iterator of texts (the simple path, enough for small corpora and the demo)."""
    tok = new_bpe_tokenizer(token_type)
    trainer = bpe_trainer(token_type, vocab_size, num_sentinels, min_frequency, show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return finalize(tok, token_type, num_sentinels)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (or a model folder holding one) and check the contract."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}: train one with `python train_tokenizer.py` "
                                f"or pass the folder of a trained model")
    tok = AutoTokenizer.from_pretrained(str(p))
    check_tokenizer(tok, source=str(p))
    return tok


def check_tokenizer(tok, source: str = "tokenizer") -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != i:
            raise ValueError(f"{source}: special token {t} must have id {i}, "
                             f"got {tok.convert_tokens_to_ids(t)}")
    ids = tok("测试")["input_ids"]
    if not ids or ids[-1] != EOS_ID or ids.count(EOS_ID) != 1:
        raise ValueError(f"{source}: the tokenizer must append [EOS] (id {EOS_ID}) exactly once; got {ids}")
