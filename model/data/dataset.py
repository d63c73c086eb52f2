"""One dataset for every trainer: any data source in (model/data/sources.py: parquet, .txt, .jsonl, .json, .csv,
globs, folders, ``datasets`` sources), padded text-to-text batches out, resumable exactly.

Why it is built this way:

* Two kinds of rows. ``prompt``/``response`` rows are pairs already. ``text`` rows (prose: most pretraining data)
  become pairs on the fly, either *prefix -> continuation* split at a sentence boundary or T5 *span corruption*
  with the tokenizer's ``<extra_id_i>`` sentinels. Each text row is tokenised once; the transform works on ids
  with a random generator seeded by (seed, epoch, sample key), so a resumed run rebuilds exactly the same pairs.
* Two ways to hold data. In memory (map-style, all rows tokenised once) or streaming (pyarrow record batches,
  a seeded shuffle buffer; memory depends on the buffer, not on the file size).
* Sharding by global sample index: sample ``g`` goes to rank ``g % world_size`` and the tail that would make
  ranks unequal is dropped, so no sample is seen twice in an epoch and every rank has the same batch count.
* Batches are produced by explicit state machines (no hidden generator state), so ``state_dict()`` is always the
  exact position of the next batch; ``load_state_dict()`` restores it (streaming: reader offsets, the shuffle
  buffer and the RNG state are saved).
* Truncation is by tokens (the tokenizer appends ``[EOS]`` itself and keeps it when truncating); padding is
  dynamic per batch; optional length grouping sorts ``length_group_batches`` batches' worth of samples by
  length, splits them and shuffles the batch order (the longest batch first, so an OOM shows at step 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from rich.progress import Progress

from config import EOS_ID, PAD_ID, sentinel_token
from model.packing import collate_packed, pack_rows

IGNORE_INDEX = -100
TEXT_MODES = ("prefix", "span", "denoise", "copy")  # "a+b" or "a:2+b:1": each text row draws one at that share
DEFAULT_COPY_LEN = 64  # copy rows: tokens per copied window
SENTENCE_END_CHARS = set("。！？!?；;…\n")
PAIR, TEXT = 0, 1
TOKENIZE_CHUNK = 256  # rows tokenised together in streaming mode


# ------------------------------------------------------------------------------------------- sources
# Files, globs, folders and datasets sources, mapped to prompt/response or text rows: model/data/sources.py.
from model.data.sources import (SourceInfo, bad_row_report, inspect_source, iter_source_rows,  # noqa: E402,F401
                                open_sources, parse_file_spec)


# -------------------------------------------------------------------------------------------- encoding
def count_sentinels(tokenizer) -> int:
    n = int(getattr(tokenizer, "init_kwargs", {}).get("num_sentinels", 0) or 0)
    if n:
        return n
    while tokenizer.convert_tokens_to_ids(sentinel_token(n)) == 7 + n and n < 10000:
        n += 1
    return n


def parse_text_mode(text_mode: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``prefix``, ``prefix+denoise`` (equal shares), ``prefix:2+copy:1`` (shares 2/3, 1/3), ``mix`` =
    ``prefix+span`` -> (modes, shares summing to 1)."""
    spec = "prefix+span" if text_mode == "mix" else str(text_mode)
    modes, weights = [], []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = -1.0
        if name not in TEXT_MODES or not w > 0 or name in modes:
            raise ValueError(f"bad text_mode {text_mode!r} at {part!r}: expected modes from {', '.join(TEXT_MODES)}"
                             f" (or mix), each once, joined by '+', each optionally with a positive share "
                             f"(e.g. prefix+denoise, or prefix:2+copy:1)")
        modes.append(name)
        weights.append(w)
    total = sum(weights)
    return tuple(modes), tuple(w / total for w in weights)


class Encoder:
    """Tokenises rows and turns text rows into pairs (prefix -> continuation, or span corruption).

    Everything random is drawn from a generator seeded by (seed, epoch, key), so the pair built for a sample is
    a pure function of its key and epoch: nothing to save for an exact resume.
    """

    def __init__(self, tokenizer, max_source_len: int = 256, max_target_len: int = 256, text_mode: str = "prefix",
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0,
                 copy_max_len: int = DEFAULT_COPY_LEN):
        self.modes, self.shares = parse_text_mode(text_mode)
        if copy_max_len < 2:
            raise ValueError(f"copy_max_len must be at least 2 (one token plus [EOS]), got {copy_max_len}")
        self.copy_max_len = copy_max_len
        self.cum_shares = np.cumsum(self.shares)
        if max_source_len < 2 or max_target_len < 2:
            raise ValueError("max_source_len and max_target_len must be at least 2 (one token plus [EOS])")
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_noise_span_length < 1.0:
            raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
        self.tokenizer = tokenizer
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.text_mode, self.seed = text_mode, seed
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.num_sentinels = count_sentinels(tokenizer)
        if {"span", "denoise"} & set(self.modes) and self.num_sentinels == 0:
            raise ValueError("span corruption and denoising need sentinel tokens <extra_id_0>...; this tokenizer "
                             "has none")
        self.sentinel_ids = np.array([tokenizer.convert_tokens_to_ids(sentinel_token(i))
                                      for i in range(self.num_sentinels)], dtype=np.int32)
        vocab = tokenizer.get_vocab()
        ends = [i for t, i in vocab.items() if t and (t[-1] in SENTENCE_END_CHARS or t == "<0x0A>")]
        self.sentence_end = np.zeros(max(vocab.values()) + 1, dtype=bool)
        self.sentence_end[ends] = True
        # A text row longer than this is cut at load (a random window of it is used each epoch).
        self.text_cap = 8 * (max_source_len + max_target_len)

    # -- tokenisation
    def encode_rows(self, kind: str, rows: Sequence[tuple]) -> list[Optional[tuple]]:
        """Rows -> list of ``(kind, a, b)`` (None for an empty row, which the caller counts as skipped)."""
        tok = self.tokenizer
        if kind == "pairs":
            prompts = [str(r[0]) for r in rows]
            responses = [str(r[1]) for r in rows]
            src = tok(prompts, truncation=True, max_length=self.max_source_len)["input_ids"]
            tgt = tok(responses, truncation=True, max_length=self.max_target_len)["input_ids"]
            return [None if not (p.strip() and r.strip()) else
                    (PAIR, np.asarray(s, dtype=np.int32), np.asarray(t, dtype=np.int32))
                    for p, r, s, t in zip(prompts, responses, src, tgt)]
        texts = [str(r[0]) for r in rows]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [None if len(x) < 2 else (TEXT, np.asarray(x[: self.text_cap], dtype=np.int32), None) for x in ids]

    def length(self, item: tuple) -> tuple[int, int]:
        """(source, target) tokens the sample will have, for length grouping; text rows: an estimate from the
        text mode (the split is drawn later)."""
        kind, a, b = item
        if kind == PAIR:
            return int(len(a)), int(len(b))
        n = min(len(a), self.max_source_len + self.max_target_len - 2)
        d, m = self.noise_density, self.mean_noise_span_length
        short = min(len(a), self.max_source_len - 1, self.max_target_len - 1)
        copy = min(short, self.copy_max_len - 1)
        est = {"prefix": (n / 2, n / 2), "span": (n * (1 - d + d / m), n * d * (1 + 1 / m)),
               "denoise": (short * (1 - d + d / m), short), "copy": (copy, copy)}
        src = sum(est[k][0] * w for k, w in zip(self.modes, self.shares))
        tgt = sum(est[k][1] * w for k, w in zip(self.modes, self.shares))
        return min(int(src) + 1, self.max_source_len), min(int(tgt) + 1, self.max_target_len)

    # -- text rows -> pairs
    def rng(self, epoch: int, key: Sequence[int]) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), *(int(k) for k in key)])

    def to_pair(self, item: tuple, epoch: int, key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        kind, a, b = item
        if kind == PAIR:
            return a, b
        rng = self.rng(epoch, key)
        mode = self.draw_mode(rng)
        if mode == "span":
            return self.span_corrupt(a, rng)
        if mode == "denoise":
            return self.denoise(a, rng)
        if mode == "copy":
            return self.copy(a, rng)
        return self.prefix_split(a, rng)

    def draw_mode(self, rng: np.random.Generator) -> str:
        """One mode at its share (equal shares draw an integer, so their pairs do not depend on the syntax)."""
        if len(self.modes) == 1:
            return self.modes[0]
        if len(set(self.shares)) == 1:
            return self.modes[int(rng.integers(len(self.modes)))]
        return self.modes[min(int(np.searchsorted(self.cum_shares, rng.random(), side="right")),
                              len(self.modes) - 1)]

    def _window(self, doc: np.ndarray, size: int, rng) -> np.ndarray:
        """A random window of ``size`` tokens, moved to a sentence start when one is near."""
        if len(doc) <= size:
            return doc
        start = int(rng.integers(0, len(doc) - size + 1))
        if start > 0:
            ends = np.flatnonzero(self.sentence_end[doc[start - 1: start - 1 + size // 4]])
            if len(ends):
                start = min(start + int(ends[0]), len(doc) - size)
        return doc[start: start + size]

    def prefix_split(self, doc: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Prefix -> continuation, split at the sentence boundary nearest a random point in 30-70%."""
        ms, mt = self.max_source_len - 1, self.max_target_len - 1
        w = self._window(doc, ms + mt, rng)
        n = len(w)
        lo, hi = max(1, n - mt), min(ms, n - 1)  # split b must leave <= ms source and <= mt target tokens
        target = int(round(n * rng.uniform(0.3, 0.7)))
        bounds = np.flatnonzero(self.sentence_end[w[:-1]]) + 1
        bounds = bounds[(bounds >= lo) & (bounds <= hi)]
        if len(bounds):
            b = int(bounds[np.argmin(np.abs(bounds - target))])
        else:
            b = int(min(max(target, lo), hi))
        eos = np.array([EOS_ID], dtype=np.int32)
        return np.concatenate([w[:b], eos]), np.concatenate([w[b:], eos])

    @staticmethod
    def _segments(num_items: int, num_segments: int, rng) -> np.ndarray:
        """Split ``num_items`` into ``num_segments`` random positive lengths."""
        if num_segments <= 1:
            return np.array([num_items])
        cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [num_items]]))

    def _noise_layout(self, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """Lengths of the kept and noise segments of an ``n``-token window (T5's span layout); the kept segments
        at both ends may be empty, so a span can also open the text."""
        num_noise = min(max(1, int(round(n * self.noise_density))), n - 1)
        num_spans = max(1, int(round(num_noise / self.mean_noise_span_length)))
        num_spans = min(num_spans, num_noise, n - num_noise + 1, self.num_sentinels)
        noise_len = self._segments(num_noise, num_spans, rng)
        keep_len = self._segments(n - num_noise + 2, num_spans + 1, rng)
        keep_len[0] -= 1
        keep_len[-1] -= 1  # the outer kept segments may be empty, the inner ones are not
        return keep_len, noise_len

    def span_corrupt(self, doc: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """T5 span corruption: noise spans replaced by sentinels in the input; the target lists them."""
        d, m = self.noise_density, self.mean_noise_span_length
        ms, mt = self.max_source_len - 1, self.max_target_len - 1
        # window length n such that the input (n - noise + spans) and the target (noise + spans) both fit
        n_max = min(int(ms / (1 - d + d / m)), int(mt / (d + d / m)))
        w = self._window(doc, max(2, n_max), rng)
        src, tgt = self._cut_spans(w, *self._noise_layout(len(w), rng))
        eos = np.array([EOS_ID], dtype=np.int32)
        return np.concatenate([src[:ms], eos]), np.concatenate([tgt[:mt], eos])

    def _cut_spans(self, w: np.ndarray, keep_len: np.ndarray,
                   noise_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window with each noise span replaced by its sentinel, and the spans each after its sentinel."""
        src, tgt, pos = [], [], 0
        for i in range(len(noise_len)):
            s = self.sentinel_ids[i: i + 1]
            src += [w[pos: pos + keep_len[i]], s]
            pos += keep_len[i]
            tgt += [s, w[pos: pos + noise_len[i]]]
            pos += noise_len[i]
        src.append(w[pos:])
        return np.concatenate(src), np.concatenate(tgt)

    def denoise(self, doc: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Denoising (BART's text infilling with T5 sentinels): noise spans replaced by sentinels in the input;
        the target is the whole window. Most target tokens are read off the input, so it teaches the
        cross-attention to copy, which extraction tasks need and which prefix and span targets never ask for."""
        w = self._window(doc, max(2, min(self.max_source_len, self.max_target_len) - 1), rng)
        src, _ = self._cut_spans(w, *self._noise_layout(len(w), rng))
        eos = np.array([EOS_ID], dtype=np.int32)
        return np.concatenate([src, eos]), np.concatenate([w, eos])

    def copy(self, doc: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """A window of at most ``copy_max_len`` tokens, to be written out again: the plain copy that extraction
        builds on (every subject and object is a span of the sentence). Short windows make the skill cheap to
        practise; a small T5 acquires it abruptly after a plateau (docs/recipe.md)."""
        size = max(1, min(self.copy_max_len, self.max_source_len, self.max_target_len) - 1)
        w = self._window(doc, size, rng)
        eos = np.array([EOS_ID], dtype=np.int32)
        return np.concatenate([w, eos]), np.concatenate([w, eos])


def collate_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]], pad_to_multiple_of: int = 0) -> dict:
    """Dynamic padding: pad to the batch's longest source/target (optionally rounded up to a multiple)."""
    def padded_len(n):
        if pad_to_multiple_of and pad_to_multiple_of > 1:
            return int(math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of)
        return n
    b = len(pairs)
    s_len = padded_len(max(len(p[0]) for p in pairs))
    t_len = padded_len(max(len(p[1]) for p in pairs))
    input_ids = np.full((b, s_len), PAD_ID, dtype=np.int64)
    attention = np.zeros((b, s_len), dtype=np.int64)
    labels = np.full((b, t_len), IGNORE_INDEX, dtype=np.int64)
    for i, (s, t) in enumerate(pairs):
        input_ids[i, : len(s)] = s
        attention[i, : len(s)] = 1
        labels[i, : len(t)] = t
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


class Seq2SeqCollator:
    """The same collation for transformers' Trainer: features with ``input_ids`` and ``labels`` lists."""

    def __init__(self, pad_to_multiple_of: int = 0):
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        pairs = [(np.asarray(f["input_ids"]), np.asarray(f["labels"])) for f in features]
        return collate_pairs(pairs, self.pad_to_multiple_of)


@dataclass
class Batch:
    tensors: dict
    keys: list  # (source, row, occurrence) of each sample
    epoch: int

    def num_tokens(self) -> tuple[int, int]:
        """Non-pad (source, target) tokens."""
        return int(self.tensors["attention_mask"].sum()), int((self.tensors["labels"] != IGNORE_INDEX).sum())


def _epoch_occurrences(n: int, weight: float, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """Rows used by one source in one epoch: ``floor(weight)`` full passes plus a random fraction."""
    full = int(math.floor(weight))
    out = [(o, np.arange(n)) for o in range(full)]
    k = int(round((weight - full) * n))
    if k > 0:
        out.append((full, np.sort(rng.permutation(n)[:k])))
    return out


def _group_batches(items: list, lengths, batch_size: int, group_by_length: bool,
                   rng: np.random.Generator, sub_batches: int = 8) -> list[list]:
    """Split items into batches; when grouping, sort by length first and shuffle the batch order.

    Two padded sides: sort by the side with more tokens, then re-sort each run of ``sub_batches`` batches by the
    other side. On the chatlm SFT samples (batch 8) this leaves 14% padding, against 28% sorting by the sum and
    41% for transformers' LengthGroupedSampler (input length only).
    """
    if group_by_length and len(items) > batch_size:
        lens = np.asarray(lengths, dtype=np.int64).reshape(len(items), 2)
        first, second = (lens[:, 1], lens[:, 0]) if lens[:, 1].sum() >= lens[:, 0].sum() else (lens[:, 0], lens[:, 1])
        order = np.argsort(-first, kind="stable")
        run = sub_batches * batch_size
        order = np.concatenate([sub[np.argsort(-second[sub], kind="stable")]
                                for sub in (order[j: j + run] for j in range(0, len(order), run))])
        items = [items[i] for i in order]
    batches = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []  # a short batch stays last
    if group_by_length and len(batches) > 2:
        rest = batches[1:]
        perm = rng.permutation(len(rest))
        batches = [batches[0]] + [rest[i] for i in perm]  # longest batch first: an OOM shows at once
    batches += tail
    return batches


def _packed_batches(items: list, pair_lengths, batch_size: int, max_source_len: int, max_target_len: int,
                    rng: np.random.Generator) -> list[list[list]]:
    """Items packed into rows (:func:`model.packing.pack_rows`), rows of similar fill batched together, the
    batch order shuffled. Each batch is a list of rows, each row a list of items."""
    lens = np.asarray(pair_lengths, dtype=np.int64).reshape(-1, 2)
    rows = pack_rows(lens, max_source_len, max_target_len)
    rows.sort(key=lambda r: -int(lens[r].sum()))
    batches = [[[items[i] for i in r] for r in rows[j: j + batch_size]] for j in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# --------------------------------------------------------------------------------------- in memory
class TextToTextDataset(torch.utils.data.Dataset):
    """Map-style dataset: every row tokenised once and held in memory.

    ``__getitem__`` gives ``{"input_ids", "labels"}`` (epoch 0 of the weighted expansion) for transformers'
    Trainer; the project's trainer draws batches through :class:`InMemoryBatches`.
    """

    def __init__(self, files, tokenizer, max_source_len: int = 256, max_target_len: int = 256,
                 text_mode: str = "prefix", noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 seed: int = 0, max_samples: int = 0, show_progress: bool = False,
                 copy_max_len: int = DEFAULT_COPY_LEN):
        self.sources = files if isinstance(files, list) and files and isinstance(files[0], SourceInfo) \
            else open_sources(files)
        self.encoder = Encoder(tokenizer, max_source_len, max_target_len, text_mode, noise_density,
                               mean_noise_span_length, seed, copy_max_len)
        self.seed = seed
        self.items: list[list] = []  # per source: item or None (skipped)
        self.skipped: dict[str, int] = {}
        total = sum(s.num_rows for s in self.sources)
        with Progress(disable=not show_progress, transient=True) as progress:
            task = progress.add_task("tokenising", total=total)
            for src in self.sources:
                enc: list = []
                for _, rows, _ in iter_source_rows(src, chunk=4096):
                    enc.extend(self.encoder.encode_rows(src.kind, rows))
                    progress.advance(task, len(rows))
                    if max_samples and len(enc) >= max_samples:
                        enc = enc[:max_samples]
                        break
                self.skipped[src.path] = sum(1 for e in enc if e is None)
                self.items.append(enc)
        self.valid_rows = [np.array([i for i, e in enumerate(enc) if e is not None], dtype=np.int64)
                           for enc in self.items]
        self.lengths = [np.array([(0, 0) if e is None else self.encoder.length(e) for e in enc],
                                 dtype=np.int64).reshape(-1, 2) for enc in self.items]
        if sum(len(v) for v in self.valid_rows) == 0:
            raise ValueError(f"no usable rows in {', '.join(s.path for s in self.sources)} "
                             f"(skipped {sum(self.skipped.values())} empty rows)")
        self.sample_keys = self.epoch_keys(0)  # the samples in index order (len and [i]; evaluation walks them)

    def epoch_keys(self, epoch: int) -> np.ndarray:
        """(source, row, occurrence) of every sample of an epoch, before shuffling."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 7])
        parts = []
        for s, (src, rows) in enumerate(zip(self.sources, self.valid_rows)):
            for occ, idx in _epoch_occurrences(len(rows), src.weight, rng):
                k = np.empty((len(idx), 3), dtype=np.int64)
                k[:, 0], k[:, 1], k[:, 2] = s, rows[idx], occ
                parts.append(k)
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)

    def item(self, key) -> tuple:
        return self.items[int(key[0])][int(key[1])]

    def length(self, key) -> tuple[int, int]:
        s, t = self.lengths[int(key[0])][int(key[1])]
        return int(s), int(t)

    def key_lengths(self, keys: np.ndarray) -> np.ndarray:
        """(source, target) lengths of each key, shape (n, 2)."""
        out = np.zeros((len(keys), 2), dtype=np.int64)
        for s in range(len(self.sources)):
            m = keys[:, 0] == s
            out[m] = self.lengths[s][keys[m, 1]]
        return out

    def pair(self, key, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.to_pair(self.item(key), epoch, key)

    def __len__(self) -> int:
        return len(self.sample_keys)

    def __getitem__(self, i: int) -> dict:
        s, t = self.pair(self.sample_keys[i], 0)
        return {"input_ids": s.tolist(), "labels": t.tolist()}


class InMemoryBatches:
    """Batches of a :class:`TextToTextDataset` for one rank; state = (epoch, batch index) is exact."""

    def __init__(self, dataset: TextToTextDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, group_by_length: bool = True, length_group_batches: int = 64,
                 pad_to_multiple_of: int = 0, packing: bool = False):
        self.ds, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.packing = packing
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.length_group_batches, self.pad_to_multiple_of = max(1, length_group_batches), pad_to_multiple_of
        self.epoch, self.batch_index = 0, 0
        self._plan_epoch, self._plan = None, None
        if self.samples_per_rank(0) == 0:
            raise ValueError(f"{len(dataset)} samples cannot be split over {world_size} processes")

    def samples_per_rank(self, epoch: int = 0) -> int:
        return len(self.ds.epoch_keys(epoch)) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.plan(self.epoch))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The rank's batches of an epoch: a pure function of (seed, epoch, rank)."""
        if self._plan_epoch == epoch:
            return self._plan
        keys = self.ds.epoch_keys(epoch)
        n = (len(keys) // self.world_size) * self.world_size
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(len(keys)) if self.shuffle \
            else np.arange(len(keys))
        mine = keys[order[:n][self.rank::self.world_size]]
        all_lengths = None if self.packing else self.ds.key_lengths(mine)  # packing measures exact pairs
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 1000 + self.rank])
        batches: list[np.ndarray] = []
        group = self.batch_size * (self.length_group_batches if self.group_by_length else 1)
        for i in range(0, len(mine), group):
            chunk = list(range(i, min(i + group, len(mine))))
            if self.packing:  # exact lengths: text rows are split into pairs now (the split is per epoch)
                exact = [tuple(map(len, self.ds.pair(mine[j], epoch))) for j in chunk]
                enc = self.ds.encoder
                for b in _packed_batches(chunk, exact, self.batch_size, enc.max_source_len, enc.max_target_len, rng):
                    batches.append([mine[r] for r in b])
                continue
            lengths = all_lengths[i: i + len(chunk)]
            for b in _group_batches(chunk, lengths, self.batch_size, self.group_by_length and self.shuffle, rng):
                batches.append(mine[b])
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def next_batch(self) -> Batch:
        batches = self.plan(self.epoch)
        if self.batch_index >= len(batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            batches = self.plan(self.epoch)
        keys = batches[self.batch_index]
        self.batch_index += 1
        if self.packing:
            rows = [[self.ds.pair(k, self.epoch) for k in row] for row in keys]
            return Batch(collate_packed(rows), [tuple(map(int, k)) for row in keys for k in row], self.epoch)
        pairs = [self.ds.pair(k, self.epoch) for k in keys]
        return Batch(collate_pairs(pairs, self.pad_to_multiple_of), [tuple(map(int, k)) for k in keys],
                     self.epoch)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": "in_memory", "epoch": self.epoch, "batch_index": self.batch_index, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_data_state(state, "in_memory", self.world_size)
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


def check_data_state(state: dict, kind: str, world_size: int) -> None:
    """A checkpoint's data position only resumes the same kind of reader over the same number of processes."""
    if state.get("kind") != kind:
        how = "streams" if kind == "streaming" else "reads in memory"
        raise ValueError(f"checkpoint holds a {state.get('kind')!r} data state; this run {how} "
                         f"(resume with the same --streaming setting)")
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint was written by {state['world_size']} processes, this run has "
                         f"{world_size}: exact resume needs the same number")


# --------------------------------------------------------------------------------------- streaming
@dataclass
class _StreamState:
    epoch: int = 0
    positions: list = field(default_factory=list)  # per source: [occurrence, next_row, byte_offset]
    emitted: list = field(default_factory=list)  # per source: rows emitted this epoch
    global_index: int = 0
    raw: list = field(default_factory=list)  # [(key, source, row values)] of this rank, not yet tokenised
    buffer: list = field(default_factory=list)  # [(key, item)]
    ready: list = field(default_factory=list)  # batches made but not yet returned: [[(key, item)]]
    batch_index: int = 0
    skipped: int = 0


class StreamingBatches:
    """Streaming batches for one rank: files read in record batches, a seeded shuffle buffer, exact state.

    Sources are interleaved deterministically in proportion to their per-epoch row counts (weights applied), so
    every rank sees the same global sequence and keeps its share ``g % world_size == rank``.
    """

    def __init__(self, files, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 10000, group_by_length: bool = True, length_group_batches: int = 64,
                 max_source_len: int = 256, max_target_len: int = 256, text_mode: str = "prefix",
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, pad_to_multiple_of: int = 0,
                 read_chunk: int = 1024, packing: bool = False, copy_max_len: int = DEFAULT_COPY_LEN):
        self.sources = open_sources(files)
        self.encoder = Encoder(tokenizer, max_source_len, max_target_len, text_mode, noise_density,
                               mean_noise_span_length, seed, copy_max_len)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.group_by_length, self.length_group_batches = group_by_length, max(1, length_group_batches)
        self.pad_to_multiple_of, self.read_chunk, self.packing = pad_to_multiple_of, read_chunk, packing
        self._readers: dict = {}
        self._start_epoch(0)
        if self.samples_per_rank(0) == 0:
            raise ValueError(f"{self.epoch_total(0)} samples cannot be split over {world_size} processes")

    # -- epoch bookkeeping
    def _source_plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Per source: [(occurrence, rows)] for the epoch (fractional weights take the first rows of a pass
        whose start rotates with the epoch, so no per-row list is ever built)."""
        plans = []
        for s, src in enumerate(self.sources):
            full = int(math.floor(src.weight))
            p = [(o, src.num_rows) for o in range(full)]
            k = int(round((src.weight - full) * src.num_rows))
            if k > 0:
                p.append((full, k))
            plans.append(p)
        return plans

    def epoch_total(self, epoch: int = 0) -> int:
        return sum(n for p in self._source_plan(epoch) for _, n in p)

    def samples_per_rank(self, epoch: int = 0) -> int:
        return self.epoch_total(epoch) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return int(math.ceil(self.samples_per_rank(self.st.epoch) / self.batch_size))

    def _start_epoch(self, epoch: int) -> None:
        self.st = _StreamState(epoch=epoch, positions=[[0, 0, 0] for _ in self.sources],
                               emitted=[0 for _ in self.sources])
        self._rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 2000 + self.rank])
        self._plan = self._source_plan(epoch)
        self._quota = [sum(n for _, n in p) for p in self._plan]
        self._limit = (sum(self._quota) // self.world_size) * self.world_size
        self._readers = {}

    # -- reading
    def _next_raw(self):
        """The next row of the global interleaved sequence, or None when the epoch's rows are exhausted."""
        st = self.st
        if st.global_index >= self._limit:
            return None
        # the source furthest behind its share goes next (deterministic weighted round-robin)
        best, best_frac = None, None
        for s, q in enumerate(self._quota):
            if st.emitted[s] < q:
                frac = st.emitted[s] / q
                if best is None or frac < best_frac:
                    best, best_frac = s, frac
        if best is None:
            return None
        s = best
        occ, row, off = st.positions[s]
        occ_rows = dict(self._plan[s])[occ]
        src = self.sources[s]
        start = 0
        if occ_rows < src.num_rows:  # a fractional pass starts at a row that rotates with the epoch
            start = (st.epoch * 7919 * occ_rows) % src.num_rows
        phys = (start + row) % src.num_rows
        value = self._read_row(s, phys, off if start == 0 else 0)
        st.emitted[s] += 1
        row += 1
        if row >= occ_rows:
            occ, row, off = occ + 1, 0, 0
            self._readers.pop(s, None)
        else:
            off = self._readers[s]["offset"] if s in self._readers else 0
        st.positions[s] = [occ, row, off]
        g = st.global_index
        st.global_index += 1
        return (s, phys, occ, g), value

    def _read_row(self, s: int, phys: int, offset: int):
        """Row ``phys`` of source ``s`` through a chunked reader that is reopened only when it must seek."""
        r = self._readers.get(s)
        if r is None or not (r["first"] <= phys < r["first"] + len(r["rows"])):
            if r is None or phys != r["first"] + len(r["rows"]):
                it = iter_source_rows(self.sources[s], phys, self.read_chunk,
                                      offset if self.sources[s].fmt in ("txt", "jsonl") else 0)
                r = {"iter": it}
            try:
                first, rows, offs = next(r["iter"])
            except StopIteration:
                raise RuntimeError(f"{self.sources[s].path}: ended before row {phys}; was it changed while "
                                   f"training?") from None
            r.update(first=first, rows=rows, offs=offs)
            self._readers[s] = r
        i = phys - r["first"]
        r["offset"] = r["offs"][i] if r["offs"] else 0
        return r["rows"][i]

    def _fill_buffer(self) -> None:
        st = self.st
        while len(st.buffer) < self.shuffle_buffer:
            want = min(TOKENIZE_CHUNK, self.shuffle_buffer - len(st.buffer))
            while len(st.raw) < want:
                nxt = self._next_raw()
                if nxt is None:
                    break
                (s, phys, occ, g), value = nxt
                if g % self.world_size == self.rank:
                    st.raw.append(((s, phys, occ), s, value))
            if not st.raw:
                return
            take, st.raw = st.raw, []
            by_src: dict[int, list] = {}
            for j, (_, s, _) in enumerate(take):
                by_src.setdefault(s, []).append(j)
            encoded: list = [None] * len(take)
            for s, idx in by_src.items():
                enc = self.encoder.encode_rows(self.sources[s].kind, [take[j][2] for j in idx])
                for j, e in zip(idx, enc):
                    encoded[j] = e
            for (key, _, _), e in zip(take, encoded):
                if e is None:
                    st.skipped += 1
                else:
                    st.buffer.append((key, e))

    def _pop(self):
        self._fill_buffer()
        buf = self.st.buffer
        if not buf:
            return None
        j = int(self._rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        return buf.pop()

    def _make_batches(self) -> None:
        want = self.batch_size * (self.length_group_batches if self.group_by_length else 1)
        items = []
        while len(items) < want:
            it = self._pop()
            if it is None:
                break
            items.append(it)
        if items and self.packing:
            exact = [tuple(map(len, self.encoder.to_pair(e, self.st.epoch, key))) for key, e in items]
            self.st.ready = _packed_batches(items, exact, self.batch_size, self.encoder.max_source_len,
                                            self.encoder.max_target_len, self._rng)
        elif items:
            lengths = [self.encoder.length(e) for _, e in items]
            self.st.ready = _group_batches(items, lengths, self.batch_size, self.group_by_length, self._rng)

    def next_batch(self) -> Batch:
        if not self.st.ready:
            self._make_batches()
        if not self.st.ready:
            self._start_epoch(self.st.epoch + 1)
            self._make_batches()
            if not self.st.ready:
                raise RuntimeError("the training files produced no usable sample in a whole epoch")
        batch = self.st.ready.pop(0)
        self.st.batch_index += 1
        if self.packing:
            rows = [[self.encoder.to_pair(e, self.st.epoch, key) for key, e in row] for row in batch]
            return Batch(collate_packed(rows), [tuple(k) for row in batch for k, _ in row], self.st.epoch)
        pairs = [self.encoder.to_pair(e, self.st.epoch, key) for key, e in batch]
        return Batch(collate_pairs(pairs, self.pad_to_multiple_of), [tuple(k) for k, _ in batch], self.st.epoch)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def iter_samples(self) -> Iterator[dict]:
        """Single samples in stream order (for transformers' Trainer with an IterableDataset)."""
        while True:
            it = self._pop()
            if it is None:
                return
            key, e = it
            s, t = self.encoder.to_pair(e, self.st.epoch, key)
            yield {"input_ids": s.tolist(), "labels": t.tolist()}

    # -- exact state
    def state_dict(self) -> dict:
        st = self.st
        return {"kind": "streaming", "epoch": st.epoch, "positions": [list(p) for p in st.positions],
                "emitted": list(st.emitted), "global_index": st.global_index,
                "raw": list(st.raw), "buffer": list(st.buffer), "ready": [list(b) for b in st.ready],
                "batch_index": st.batch_index, "rng_state": self._rng.bit_generator.state,
                "skipped": st.skipped, "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "files": [(s.path, s.weight, s.num_rows) for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        check_data_state(state, "streaming", self.world_size)
        files = [(s.path, s.weight, s.num_rows) for s in self.sources]
        if [tuple(f) for f in state["files"]] != files:
            raise ValueError(f"training files changed since the checkpoint: {state['files']} -> {files}")
        self._start_epoch(int(state["epoch"]))
        st = self.st
        st.positions = [list(p) for p in state["positions"]]
        st.emitted, st.global_index = list(state["emitted"]), int(state["global_index"])
        st.raw, st.buffer = list(state["raw"]), list(state["buffer"])
        st.ready = [list(b) for b in state["ready"]]
        st.batch_index, st.skipped = int(state["batch_index"]), int(state["skipped"])
        self._rng.bit_generator.state = state["rng_state"]


class StreamingTextToText(torch.utils.data.IterableDataset):
    """A torch IterableDataset over :class:`StreamingBatches` samples (transformers' Trainer, one reader)."""

    def __init__(self, files, tokenizer, **kw):
        self.files, self.tokenizer, self.kw = files, tokenizer, kw

    def __iter__(self):
        epoch = 0
        while True:
            sb = StreamingBatches(self.files, self.tokenizer, batch_size=1, **self.kw)
            if epoch:
                sb._start_epoch(epoch)
            yield from sb.iter_samples()
            epoch += 1


def make_batches(cfg, tokenizer, rank: int = 0, world_size: int = 1, show_progress: bool = False):
    """The training batch source for a TrainConfig: in memory or streaming, sharded for this rank."""
    common = dict(max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len, text_mode=cfg.text_mode,
                  noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length,
                  copy_max_len=cfg.copy_max_len)
    if cfg.streaming:
        return StreamingBatches(cfg.train_file, tokenizer, cfg.batch_size_per_gpu, rank, world_size, cfg.seed,
                                cfg.shuffle_buffer, cfg.group_by_length, cfg.length_group_batches,
                                pad_to_multiple_of=cfg.pad_to_multiple_of, packing=cfg.packing, **common)
    ds = TextToTextDataset(cfg.train_file, tokenizer, seed=cfg.seed, show_progress=show_progress, **common)
    return InMemoryBatches(ds, cfg.batch_size_per_gpu, rank, world_size, cfg.seed, True, cfg.group_by_length,
                           cfg.length_group_batches, cfg.pad_to_multiple_of, cfg.packing)
