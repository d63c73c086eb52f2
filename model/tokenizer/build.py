"""The project's fast tokenizer: build, train, save, load.

One code path for every tokenizer the kit makes, from the 40 kB demo corpus to corpora of many GB. Contract
(docs/format.md): the 7 special tokens sit at ids 0..6 (``[PAD] [EOS] [SEP] [BOS] [CLS] [MASK] [UNK]``), the
span-corruption sentinels ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` are reserved right after them at ids 7 ..
6+n (``num_sentinels``, default 100; ``<extra_id_0>`` marks the first masked span), and the post-processor
appends ``[EOS]`` once to every encoded text, so callers never add it themselves. ``\n`` and ``\t`` are
always in the vocabulary.

Two kinds, as in the reference project:
* ``char``: BPE over characters with the Metaspace scheme (spaces become ``▁``), byte fallback so that no
  UTF-8 input ever becomes ``[UNK]``; optionally a sentencepiece BPE or unigram model, converted to the same
  fast format;
* ``byte``: byte-level BPE (GPT-2 style), which cannot produce ``[UNK]`` either.

Training never holds the corpus or its distinct clauses in memory: texts are pre-tokenised and counted (in
worker processes for files, with long pieces cut into chunks and the count table capped, see
``model/tokenizer/counting.py``), and the vocabulary is trained from the counts.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from config import (DEFAULT_CHUNK_CHARS, DEFAULT_FEED_PIECES, DEFAULT_MAX_PIECES, DEFAULT_NUM_SENTINELS, EOS_ID,
                    SPECIAL_TOKENS, UNK_ID, TokenizerTrainConfig, sentinel_token)
from model.prompt import CHAT_TEMPLATE
from model.tokenizer.counting import (PieceCounts, PieceSplitter, char_frequencies, count_files, count_texts,
                                      feed_batches, write_tsv)

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
TOKEN_TYPES = ("char", "byte")
SENTENCEPIECE_TYPES = ("bpe", "unigram")
KEEP_CHARS = ["\n", "\t", "▁"]  # always in the vocabulary (layout of code and poems; spaces in one token)
SENTENCEPIECE_FILE = "sentencepiece.model"  # kept in the folder of a tokenizer trained with --sentencepiece
MAX_ALPHABET_SHARE = 0.75  # single characters may take at most this share of the learnable ids (char level)


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
        # bytes first: a "▁" spelled as byte tokens must also become a space
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")])
    elif token_type == "byte":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.decoder = decoders.ByteLevel()
    else:
        raise ValueError(f"unknown token_type {token_type!r}; expected one of {TOKEN_TYPES}")
    # Only NFC: NFKC would turn full-width Chinese punctuation into ASCII and break round trips.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer(token_type)
    return tok


def _check_vocab_size(token_type: str, vocab_size: int, num_sentinels: int) -> int:
    reserved = len(special_tokens(num_sentinels)) + (len(BYTE_TOKENS) if token_type == "char" else 0)
    if vocab_size <= reserved + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: {reserved} ids are reserved for special, "
                         f"sentinel and byte tokens")
    return reserved


def bpe_trainer(token_type: str, vocab_size: int, num_sentinels: int, min_frequency: int = 2,
                show_progress: bool = False, extra_alphabet: Sequence[str] = ()):
    """The HF BPE trainer with the project's reserved ids (``extra_alphabet``: characters to keep anyway)."""
    _check_vocab_size(token_type, vocab_size, num_sentinels)
    if token_type == "char":
        # The byte-fallback tokens are appended after training, so leave room for them.
        return trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), min_frequency=min_frequency,
                                   special_tokens=special_tokens(num_sentinels), show_progress=show_progress,
                                   initial_alphabet=KEEP_CHARS + sorted(set(extra_alphabet) - set(KEEP_CHARS)))
    return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=special_tokens(num_sentinels), show_progress=show_progress,
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def add_byte_fallback_tokens(tok: Tokenizer) -> Tokenizer:
    """Append ``<0xNN>`` tokens to a char-level vocabulary (BPE or unigram) so unseen characters fall back
    to bytes."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model["type"] == "Unigram":
        have = {p for p, _ in model["vocab"]}
        low = min((sc for _, sc in model["vocab"]), default=0.0) - 1.0
        model["vocab"] += [[t, low] for t in BYTE_TOKENS if t not in have]
    else:
        vocab = model["vocab"]
        for t in BYTE_TOKENS:
            if t not in vocab:
                vocab[t] = len(vocab)
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def finalize(tok: Tokenizer, token_type: str, num_sentinels: int) -> PreTrainedTokenizerFast:
    """Check the fixed ids, install the ``[EOS]`` post-processor and wrap for transformers."""
    if token_type == "char":
        tok = add_byte_fallback_tokens(tok)
    for i, t in enumerate(special_tokens(num_sentinels)):
        got = tok.token_to_id(t)
        if got != i:
            raise ValueError(f"special token {t!r} must have id {i}, got {got}")
    from transformers import PreTrainedTokenizerFast  # imported late: counting processes stay light

    tok.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", pair="$A [EOS] $B:1 [EOS]:1", special_tokens=[("[EOS]", EOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", sep_token="[SEP]", bos_token="[BOS]",
        cls_token="[CLS]", mask_token="[MASK]", unk_token="[UNK]",
        additional_special_tokens=[sentinel_token(i) for i in range(num_sentinels)],
        model_max_length=1_000_000, padding_side="right", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE  # the prompt layout of model/prompt.py, for apply_chat_template
    fast.init_kwargs["token_type"] = token_type
    fast.init_kwargs["num_sentinels"] = num_sentinels
    return fast


def count_pieces(texts: Optional[Iterable[str]] = None, files=None, token_type: str = "char", *,
                 columns: Optional[Sequence[str]] = None, num_proc: int = 0,
                 max_pieces: int = DEFAULT_MAX_PIECES, chunk_chars: int = DEFAULT_CHUNK_CHARS, seed: int = 0,
                 show_progress: bool = False) -> PieceCounts:
    """Count the pre-tokenised pieces of in-memory texts (this process) and/or files (worker processes)."""
    if token_type not in TOKEN_TYPES:
        raise ValueError(f"unknown token_type {token_type!r}; expected one of {TOKEN_TYPES}")
    if isinstance(texts, (str, Path)):
        raise TypeError("texts must be an iterable of texts; pass file names and globs as files=...")
    if texts is None and files is None:
        raise ValueError("nothing to train on: give texts or files")
    splitter = PieceSplitter(token_type, chunk_chars, pre_tokenizer(token_type))
    table = PieceCounts(max_pieces, seed=seed)
    if files is not None:
        table = count_files(files, splitter, columns=columns, num_proc=num_proc, max_pieces=max_pieces, seed=seed,
                            show_progress=show_progress)
    if texts is not None:
        count_texts(texts, splitter, table)
    if len(table) == 0:
        raise ValueError("the tokenizer corpus is empty: no text to count")
    return table


def char_alphabet(counts: PieceCounts, vocab_size: int, num_sentinels: int,
                  max_share: float = MAX_ALPHABET_SHARE) -> list[str]:
    """The characters a char-level vocabulary keeps as tokens.

    Chinese text has more distinct characters than a small vocabulary holds (about 11k in ../shared/data), and
    the BPE trainer keeps every character it sees, so a requested 8,192 became 11,307. When the characters
    exceed ``max_share`` of the learnable ids, only the most frequent ones are kept; the rest are spelled
    with byte-fallback tokens (still lossless), and the remaining ids go to merges.
    """
    budget = vocab_size - _check_vocab_size("char", vocab_size, num_sentinels)
    freq = char_frequencies(counts)
    rare = sorted(counts.alphabet - set(freq))  # characters only seen in pieces dropped by thinning
    limit = max(16, int(budget * max_share)) - len(KEEP_CHARS)
    if len(freq) + len(rare) <= limit:
        return sorted(freq) + rare
    return sorted(c for c, _ in freq.most_common(limit))


def train_from_counts(counts: PieceCounts, vocab_size: int = 29298, token_type: str = "char",
                      num_sentinels: int = DEFAULT_NUM_SENTINELS, min_frequency: int = 2,
                      sentencepiece: Optional[str] = None, feed_pieces: int = DEFAULT_FEED_PIECES,
                      seed: int = 0, show_progress: bool = False, num_threads: int = 0,
                      character_coverage: float = 0.9995) -> PreTrainedTokenizerFast:
    """Train the vocabulary from piece counts: HF BPE (default) or sentencepiece BPE/unigram."""
    if sentencepiece:
        return _train_sentencepiece(counts, sentencepiece, vocab_size, token_type, num_sentinels,
                                    num_threads, character_coverage, seed)
    _check_vocab_size(token_type, vocab_size, num_sentinels)
    # The trainer takes text only: feed each piece as often as it was counted, scaled down past feed_pieces
    # (feeding costs ~4 us a piece; merges only need the counts' proportions). No normaliser and no
    # pre-tokeniser: each fed string is one word.
    scale = max(1.0, counts.mass() / feed_pieces) if feed_pieces else 1.0
    feeder = Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True) if token_type == "char"
                       else models.BPE(unk_token=None))
    alphabet = char_alphabet(counts, vocab_size, num_sentinels) if token_type == "char" else ()
    trainer = bpe_trainer(token_type, vocab_size, num_sentinels, max(1, round(min_frequency / scale)),
                          show_progress, extra_alphabet=alphabet)
    if token_type == "char":
        trainer.limit_alphabet = len(set(alphabet) | set(KEEP_CHARS))
    feeder.train_from_iterator(feed_batches(counts, scale, seed), trainer=trainer)
    tok = new_bpe_tokenizer(token_type)
    tok.model = feeder.model
    return finalize(tok, token_type, num_sentinels)


def train_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 29298, token_type: str = "char",
                    num_sentinels: int = DEFAULT_NUM_SENTINELS, min_frequency: int = 2,
                    show_progress: bool = False, *, files=None,
                    columns: Optional[Sequence[str]] = None, num_proc: int = 0,
                    max_pieces: int = DEFAULT_MAX_PIECES, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                    sentencepiece: Optional[str] = None, feed_pieces: int = DEFAULT_FEED_PIECES,
                    seed: int = 0, character_coverage: float = 0.9995) -> PreTrainedTokenizerFast:
    """Train a tokenizer on texts (an iterable, counted in this process) and/or files, globs or parquet
    columns (counted by ``num_proc`` worker processes). Memory is bounded by ``max_pieces``, not by the
    corpus."""
    counts = count_pieces(texts, files, token_type, columns=columns, num_proc=num_proc, max_pieces=max_pieces,
                          chunk_chars=chunk_chars, seed=seed, show_progress=show_progress)
    return train_from_counts(counts, vocab_size, token_type, num_sentinels, min_frequency, sentencepiece,
                             feed_pieces, seed, show_progress, num_proc, character_coverage)


# ---------------------------------------------------------------------------------------- sentencepiece
def _train_sentencepiece(counts: PieceCounts, kind: str, vocab_size: int, token_type: str, num_sentinels: int,
                         num_threads: int, character_coverage: float, seed: int) -> PreTrainedTokenizerFast:
    """Sentencepiece trained on the piece counts (its tsv input), converted to the project's fast format."""
    import sentencepiece as spm  # optional engine: loaded only when asked for

    if kind not in SENTENCEPIECE_TYPES:
        raise ValueError(f"unknown sentencepiece model {kind!r}; expected one of {SENTENCEPIECE_TYPES}")
    if token_type != "char":
        raise ValueError("sentencepiece models are char level: use token_type='char' with sentencepiece")
    reserved = _check_vocab_size(token_type, vocab_size, num_sentinels)
    learned = vocab_size - reserved - len(KEEP_CHARS)
    with tempfile.TemporaryDirectory(prefix="spm_") as tmp:
        tsv = Path(tmp) / "pieces.tsv"
        write_tsv(counts, tsv, seed=seed)
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            input=str(tsv), input_format="tsv", model_prefix=str(Path(tmp) / "m"), model_type=kind,
            vocab_size=learned + 1, hard_vocab_limit=False, character_coverage=character_coverage,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            split_by_whitespace=True, split_digits=True, byte_fallback=False, unk_id=0, bos_id=-1,
            eos_id=-1, pad_id=-1, max_sentencepiece_length=16,
            num_threads=num_threads or min(os.cpu_count() or 1, 8), minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "m.model"))
        sp_model = (Path(tmp) / "m.model").read_bytes()
    specials = special_tokens(num_sentinels)
    taken = set(specials)
    pieces: list[tuple[str, float]] = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i):
            continue
        p = sp.id_to_piece(i)
        if p not in taken:
            taken.add(p)
            pieces.append((p, sp.get_score(i)))
    low = min((sc for _, sc in pieces), default=0.0) - 1.0
    pieces += [(c, low) for c in KEEP_CHARS if c not in taken]
    if kind == "unigram":
        vocab = [(t, 0.0) for t in specials] + pieces
        tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True))
    else:
        tok = Tokenizer(models.BPE(*_bpe_from_ranked_pieces(specials, [p for p, _ in pieces]),
                                   unk_token="[UNK]", byte_fallback=True))
    base = new_bpe_tokenizer("char")
    tok.normalizer, tok.pre_tokenizer, tok.decoder = base.normalizer, base.pre_tokenizer, base.decoder
    fast = finalize(tok, token_type, num_sentinels)
    fast.sentencepiece_model = sp_model  # saved beside tokenizer.json as SENTENCEPIECE_FILE
    return fast


def _bpe_from_ranked_pieces(specials: list[str], pieces: list[str]):
    """BPE vocab and merges from pieces in merge order: each piece is the merge of two earlier pieces."""
    vocab = {t: i for i, t in enumerate(specials)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    for p in pieces:  # every character of a piece must be a token
        for ch in p:
            vocab.setdefault(ch, len(vocab))
    rank = {p: (-1 if len(p) == 1 else i) for i, p in enumerate(pieces)}
    merges = []
    for i, p in enumerate(pieces):
        if len(p) < 2:
            continue
        splits = [(max(rank.get(p[:k], 1 << 30), rank.get(p[k:], 1 << 30)), p[:k], p[k:])
                  for k in range(1, len(p))]
        splits = [s for s in splits if s[0] < i]
        for _, left, right in sorted(splits):
            merges.append((i, left, right))
    merges.sort(key=lambda m: m[0])
    return vocab, [(a, b) for _, a, b in merges]


def train_from_config(cfg: TokenizerTrainConfig) -> tuple[PreTrainedTokenizerFast, dict]:
    """Count, train, save; returns the tokenizer and the figures written to ``training_stats.json``."""
    if not cfg.inputs:
        raise ValueError("no input: pass --inputs with text files, globs, folders, .jsonl or .parquet files")
    t0 = time.time()
    counts = count_pieces(files=cfg.inputs, token_type=cfg.token_type, columns=cfg.columns,
                          num_proc=cfg.num_proc, max_pieces=cfg.max_pieces, chunk_chars=cfg.chunk_chars,
                          seed=cfg.seed, show_progress=cfg.show_progress)
    t1 = time.time()
    tok = train_from_counts(counts, cfg.vocab_size, cfg.token_type, cfg.num_sentinels, cfg.min_frequency,
                            cfg.sentencepiece, cfg.feed_pieces, cfg.seed, cfg.show_progress, cfg.num_proc,
                            cfg.character_coverage)
    t2 = time.time()
    out = save_tokenizer(tok, cfg.output_dir)
    stats = dict(counts.summary(), vocab_size=len(tok), count_seconds=round(t1 - t0, 2),
                 train_seconds=round(t2 - t1, 2), output_dir=str(out))
    (out / "training_stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1), encoding="utf-8")
    return tok, stats


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out), save_jinja_files=False)  # chat_template in tokenizer_config.json
    save_sentencepiece_model(tokenizer, out)
    return out


def save_sentencepiece_model(tokenizer, out: Path) -> None:
    """A tokenizer trained with ``--sentencepiece`` keeps sentencepiece's own model file in its folder (for
    tools that read it; the fast tokenizer, with the project's fixed ids, is tokenizer.json)."""
    sp = getattr(tokenizer, "sentencepiece_model", None)
    if sp:
        (Path(out) / SENTENCEPIECE_FILE).write_bytes(sp)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (or a model folder holding one) and check the contract."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}: train one with `python train_tokenizer.py` "
                                f"or pass the folder of a trained model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p))
    check_tokenizer(tok, source=str(p))
    if (p / SENTENCEPIECE_FILE).is_file():
        tok.sentencepiece_model = (p / SENTENCEPIECE_FILE).read_bytes()
    return tok


def check_tokenizer(tok, source: str = "tokenizer") -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != i:
            raise ValueError(f"{source}: special token {t} must have id {i}, "
                             f"got {tok.convert_tokens_to_ids(t)}")
    ids = tok("测试")["input_ids"]
    if not ids or ids[-1] != EOS_ID or ids.count(EOS_ID) != 1:
        raise ValueError(f"{source}: the tokenizer must append [EOS] (id {EOS_ID}) exactly once; got {ids}")
