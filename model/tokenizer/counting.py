"""Count pre-tokenised pieces of a corpus of any size in bounded memory, over several processes.

Why this exists: a BPE trainer keeps every distinct pre-tokenised "word" of its corpus, with a few dozen bytes
per character of it. Chinese has no spaces, so a word is a whole clause, nearly every clause is distinct, and
memory grows with the corpus (tens of GB of RAM for a few GB of text). Here:

1. pieces longer than ``chunk_chars`` characters (long CJK runs) are cut into chunks of that length before
   counting. Tokens are a few characters long, and a cut removes one character pair per chunk at a place that
   has nothing to do with the content, so every pair count shrinks by about the same factor and the merge
   order is kept;
2. the table of counts holds at most ``max_pieces`` entries. When it passes the cap it is thinned by
   threshold sampling: a piece whose weight is at least ``tau`` stays with its exact weight, a lighter piece
   stays with probability ``weight / tau`` and then weighs ``tau``. Every weight stays an unbiased estimate of
   the true count, so pair statistics stay unbiased, and memory does not depend on the corpus size.
   While the table stays under the cap the counts are exact;
3. the inputs are cut into byte ranges (text and jsonl, at line starts) and row groups (parquet), worker
   processes count them, and the parent merges their tables with the same thinning.

This module imports no transformers and no torch, so the worker processes stay light.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import traceback
import unicodedata
from collections import Counter, _count_elements  # C helper behind Counter.update: counts into any dict
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from model.progress import progress_bar

FEED_SEP = "\x00"  # joins a batch of texts for the counting regex; removed from the input texts
MAX_TEXT_CHARS = 1 << 16  # longer texts are counted in windows, so one huge line cannot blow up memory
READ_BLOCK = 1 << 22  # bytes read at a time from text files
MIN_BYTES_PER_PROCESS = 1 << 20  # below this much input per process, counting in one process is faster
PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson")


# ------------------------------------------------------------------------------------------ the table
@dataclass
class CountStats:
    """What was read: reported to the user, saved next to the tokenizer."""

    texts: int = 0
    chars: int = 0
    pieces: int = 0  # pieces counted (after chunking)
    skipped: int = 0  # rows skipped (undecodable lines, bad json, non-string cells)
    skipped_examples: list = field(default_factory=list)  # a few "file:where: why" strings
    prunes: int = 0

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(where)

    def merge(self, other: "CountStats") -> None:
        self.texts += other.texts
        self.chars += other.chars
        self.pieces += other.pieces
        self.skipped += other.skipped
        self.prunes += other.prunes
        self.skipped_examples = (self.skipped_examples + other.skipped_examples)[:5]


class PieceCounts:
    """Weighted piece counts with a size cap (threshold sampling beyond it, see the module docstring)."""

    def __init__(self, max_pieces: int = 1_000_000, seed: int = 0):
        if max_pieces < 100:
            raise ValueError(f"max_pieces={max_pieces} is too small; use at least 100")
        self.counts: dict[str, float] = {}
        self.max_pieces = int(max_pieces)
        self.tau = 0.0  # 0 while the counts are exact
        self.alphabet: set[str] = set()  # characters of pieces dropped by sampling (kept in the vocabulary)
        self.stats = CountStats()
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def exact(self) -> bool:
        return self.tau == 0.0

    def mass(self) -> float:
        return float(sum(self.counts.values()))

    def thin(self, target: int) -> None:
        """Threshold-sample the table down to about ``target`` entries, keeping every weight unbiased."""
        if len(self.counts) <= target:
            return
        keys = list(self.counts)
        w = np.fromiter(self.counts.values(), dtype=np.float64, count=len(keys))
        tau = max(_solve_tau(w, target), self.tau)
        light = w < tau
        keep = ~light | (self._rng.random(len(w)) * tau < w)
        new_w = np.where(light, tau, w)[keep]
        dropped = list(compress(keys, ~keep))
        if dropped:
            self.alphabet.update("".join(dropped))
        self.counts = dict(zip(compress(keys, keep), new_w.tolist()))
        self.tau = float(tau)
        self.stats.prunes += 1

    def merge(self, other: "PieceCounts") -> None:
        """Add another table (e.g. a worker's) into this one, thinning as needed."""
        counts = self.counts
        for k, v in other.counts.items():
            counts[k] = counts.get(k, 0.0) + v
            if len(counts) > self.max_pieces:
                self.thin(self.max_pieces // 2)
                counts = self.counts
        self.tau = max(self.tau, other.tau)
        self.alphabet |= other.alphabet
        self.stats.merge(other.stats)

    # compact form for sending a table between processes
    def __getstate__(self):
        return {"counts": self.counts, "max_pieces": self.max_pieces, "tau": self.tau,
                "alphabet": "".join(sorted(self.alphabet)), "stats": self.stats}

    def __setstate__(self, s):
        self.counts, self.max_pieces, self.tau = s["counts"], s["max_pieces"], s["tau"]
        self.alphabet, self.stats = set(s["alphabet"]), s["stats"]
        self._rng = np.random.default_rng(len(self.counts))

    def integer_counts(self, scale: float = 1.0, seed: int = 0) -> Iterator[tuple[str, int]]:
        """(piece, round(weight / scale)) with randomised rounding (unbiased); zero counts are left out."""
        rng = np.random.default_rng(seed)
        keys = list(self.counts)
        w = np.fromiter(self.counts.values(), dtype=np.float64, count=len(keys)) / scale
        n = np.floor(w + rng.random(len(w))).astype(np.int64)
        for k, c in zip(keys, n.tolist()):
            if c > 0:
                yield k, c

    def summary(self) -> dict:
        return {"distinct_pieces": len(self.counts), "exact": self.exact, "tau": self.tau,
                "weighted_pieces": round(self.mass()), "texts": self.stats.texts, "chars": self.stats.chars,
                "pieces_counted": self.stats.pieces, "thinning_rounds": self.stats.prunes,
                "skipped_rows": self.stats.skipped, "skipped_examples": self.stats.skipped_examples}


def _solve_tau(w: np.ndarray, target: int) -> float:
    """Smallest tau whose expected number of kept entries, #(w >= tau) + sum(w[w < tau]) / tau, is <= target."""
    s = np.sort(w)
    csum = np.concatenate([[0.0], np.cumsum(s)])
    n = len(s)

    def expected(tau: float) -> float:
        k = int(np.searchsorted(s, tau, side="left"))
        return (n - k) + csum[k] / tau

    lo, hi = max(float(s[0]), 1e-9), float(s[-1]) + 1.0
    if expected(lo) <= target:
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


# ------------------------------------------------------------------------------------ pre-tokenising
def _byte_continuations() -> frozenset:
    """Characters that stand for UTF-8 continuation bytes in the byte-level (GPT-2) alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    mapping = dict(zip(bs, cs))
    return frozenset(chr(mapping[b]) for b in range(0x80, 0xC0))


BYTE_CONTINUATIONS = _byte_continuations()


def chunk_piece(piece: str, chunk_chars: int, byte_level: bool = False) -> list[str]:
    """Cut a long piece into chunks of at most ``chunk_chars`` characters (byte level: whole UTF-8 chars)."""
    n = len(piece)
    if n <= chunk_chars or chunk_chars <= 0:
        return [piece]
    if not byte_level:
        return [piece[i:i + chunk_chars] for i in range(0, n, chunk_chars)]
    out, start = [], 0
    while start < n:
        end = min(start + chunk_chars, n)
        while end < n and piece[end] in BYTE_CONTINUATIONS and end > start + 1:
            end -= 1  # step back to a character start
        out.append(piece[start:end])
        start = end
    return out


def _class_body(chars: Iterable[str]) -> str:
    """A regex character class body (ranges) for a set of characters."""
    cps = sorted(ord(c) for c in chars)
    out: list[tuple[int, int]] = []
    for cp in cps:
        if out and cp == out[-1][1] + 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in out)


@functools.lru_cache(maxsize=1)
def _probe_chars() -> str:
    """Code points that may be punctuation or digits in some Unicode version: all but letters, marks and
    assigned controls (planes 4-16 hold none: unassigned, tags, private use)."""
    out = []
    for cp in range(0x40000):
        if 0xD800 <= cp <= 0xDFFF or cp == 0x61:
            continue
        cat = unicodedata.category(chr(cp))
        if cat[0] not in "LMC" or (cat == "Cn" and cp < 0x20000):
            out.append(chr(cp))
    return "".join(out)


def _isolated_by(pre) -> set[str]:
    """The characters an HF pre-tokeniser isolates, found by asking it (so its Unicode tables are the ones
    used): each candidate is put between two ``a``; isolated ones come back as one-character pieces."""
    text = "a" + "a".join(_probe_chars()) + "a"
    return {p for p, _ in pre.pre_tokenize_str(text) if len(p) == 1 and p != "a"}


@functools.lru_cache(maxsize=8)
def char_piece_pattern(chunk_chars: int) -> "re.Pattern":
    """One regex doing what the char-level pre-tokeniser does (model/tokenizer/build.py: Metaspace, then each
    digit and each punctuation character isolated), plus the chunking, over texts joined by ``FEED_SEP``.

    The punctuation and digit sets are read from HF's own pre-tokenisers. It runs about 3x faster than calling the HF pre-tokeniser text by text; tests check
    both cut alike.
    """
    from tokenizers import pre_tokenizers

    punct = _class_body(_isolated_by(pre_tokenizers.Punctuation(behavior="isolated")))
    digit = _class_body(_isolated_by(pre_tokenizers.Digits(individual_digits=True)))
    word = f"[^{punct}{digit}\u2581{FEED_SEP}]"
    limit = f"{{1,{chunk_chars}}}" if chunk_chars > 0 else "+"
    return re.compile(f"\u2581?{word}{limit}|[{punct}]|[{digit}]|\u2581")


class PieceSplitter:
    """Turns a batch of texts into the pieces the tokenizer's pre-tokeniser makes, long ones chunked."""

    def __init__(self, token_type: str, chunk_chars: int = 8, pre_tokenizer=None):
        self.token_type, self.chunk_chars = token_type, chunk_chars
        if token_type == "char":
            self.pattern = char_piece_pattern(chunk_chars)
        elif token_type == "byte":
            if pre_tokenizer is None:
                raise ValueError("byte-level counting needs the tokenizer's pre_tokenizer")
            self.pre = pre_tokenizer
            self.byte_chunk = 3 * chunk_chars if chunk_chars > 0 else 0  # a CJK character is 3 bytes
        else:
            raise ValueError(f"unknown token_type {token_type!r}")

    def __call__(self, texts: list[str]) -> list[str]:
        if self.token_type == "char":
            return self.pattern.findall(FEED_SEP.join(texts).replace(" ", "\u2581"))
        out: list[str] = []
        pre, k = self.pre.pre_tokenize_str, self.byte_chunk
        for text in texts:
            for piece, _ in pre(text):
                if k and len(piece) > k:
                    out.extend(chunk_piece(piece, k, byte_level=True))
                else:
                    out.append(piece)
        return out


# ------------------------------------------------------------------------------------------- counting
def normalize_text(text: str) -> str:
    """NFC (the tokenizer's normaliser) and no separator characters."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if FEED_SEP in text:
        text = text.replace(FEED_SEP, "")
    return text


def count_texts(texts: Iterable[str], splitter: PieceSplitter, table: PieceCounts,
                batch_chars: int = 1 << 18) -> PieceCounts:
    """Pre-tokenise and count every text into ``table`` (the hot loop: batches of texts, counted in C)."""
    stats = table.stats
    cap = table.max_pieces
    batch: list[str] = []
    size = 0

    def flush():
        pieces = splitter(batch)
        stats.pieces += len(pieces)
        _count_elements(table.counts, pieces)
        if len(table.counts) > cap:
            table.thin(cap // 2)

    for text in texts:
        stats.texts += 1
        if not text:
            continue
        text = normalize_text(text)
        stats.chars += len(text)
        if len(text) > MAX_TEXT_CHARS:  # one huge text must not become one huge list of pieces
            for i in range(0, len(text), MAX_TEXT_CHARS):
                batch.append(text[i:i + MAX_TEXT_CHARS])
                size += MAX_TEXT_CHARS
                if size >= batch_chars:
                    flush()
                    batch, size = [], 0
            continue
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    return table


# ------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs) -> list[Path]:
    """Files from paths, globs (``**`` allowed), folders or a comma-separated string, in a stable order."""
    if isinstance(inputs, (str, Path)):
        inputs = [s for s in str(inputs).split(",") if s.strip()]
    files: list[Path] = []
    for item in inputs:
        item = str(item).strip()
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"tokenizer input {item!r} matches no file")
        files.extend(found)
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


@dataclass
class Unit:
    """A piece of work for one worker: a byte range of a text/jsonl file or one parquet row group."""

    path: str
    kind: str  # text | jsonl | parquet
    start: int = 0
    end: int = 0
    row_group: int = -1

    @property
    def size(self) -> int:
        return self.end - self.start


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_EXT):
        return "parquet"
    if name.endswith(JSONL_EXT):
        return "jsonl"
    return "text"


def plan_units(files: Sequence[Path], num_parts: int) -> list[list[Unit]]:
    """Split the inputs into ``num_parts`` lists of units of about equal size (bytes)."""
    import pyarrow.parquet as pq

    whole: list[Unit] = []
    for f in files:
        kind = _kind(f)
        if kind == "parquet":
            meta = pq.ParquetFile(str(f)).metadata
            for g in range(meta.num_row_groups):
                size = max(1, meta.row_group(g).total_byte_size)
                whole.append(Unit(str(f), kind, 0, size, g))
        else:
            whole.append(Unit(str(f), kind, 0, f.stat().st_size))
    total = sum(u.size for u in whole)
    n = max(1, num_parts)
    bounds = [total * k // n for k in range(n + 1)]  # part k covers global bytes [bounds[k], bounds[k+1])
    parts: list[list[Unit]] = [[] for _ in range(n)]
    offset = 0
    for u in whole:
        if u.kind == "parquet":  # a row group is not split: it goes where its middle falls
            mid = offset + u.size // 2
            k = max(i for i in range(n) if bounds[i] <= mid)
            parts[k].append(u)
        else:
            for k in range(n):
                lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + u.size)
                if hi > lo:
                    parts[k].append(Unit(u.path, u.kind, lo - offset, hi - offset))
            if u.size == 0:
                parts[0].append(u)
        offset += u.size
    return [p for p in parts if p] or [[]]


def _decode_block(block: bytes, path: str, first_line_offset: int, stats: CountStats) -> list[str]:
    try:
        return block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        pos = first_line_offset
        for raw in block.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                stats.skip(f"{path}: line at byte {pos}: not UTF-8 ({e.reason})")
            pos += len(raw) + 1
        return lines


def iter_range_lines(unit: Unit, stats: CountStats, on_bytes: Optional[Callable[[int], None]] = None
                     ) -> Iterator[str]:
    """Lines of a text file that start inside [start, end): ranges cut anywhere never lose or repeat a line."""
    done = unit.start

    def report(upto: int) -> None:
        nonlocal done
        upto = min(upto, unit.end)
        if on_bytes is not None and upto > done:
            on_bytes(upto - done)
            done = upto

    def lines_of(data: bytes, offset: int) -> list[str]:
        return [l[:-1] if l.endswith("\r") else l for l in _decode_block(data, unit.path, offset, stats)]

    with open(unit.path, "rb") as f:
        pos = unit.start  # file offset where `tail` (the unfinished line) starts
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the line running into the range belongs to the previous one
        tail = b""
        while pos < unit.end:
            block = f.read(READ_BLOCK)
            if not block:
                if tail:
                    yield from lines_of(tail, pos)
                break
            data = tail + block
            cut = data.rfind(b"\n")
            if cut < 0:
                tail = data
                continue
            complete, tail = data[:cut], data[cut + 1:]
            if pos + cut + 1 >= unit.end:  # some of these lines start at or after `end`
                lim = unit.end - pos
                j = complete.rfind(b"\n", 0, max(lim - 1, 0))  # the last line starting before `end` ...
                nxt = complete.find(b"\n", j + 1)  # ... ends here
                yield from lines_of(complete[:nxt] if nxt >= 0 else complete, pos)
                report(unit.end)
                return
            yield from lines_of(complete, pos)
            pos += cut + 1
            report(pos)
    report(unit.end)


def iter_unit_texts(unit: Unit, columns: Optional[Sequence[str]], stats: CountStats,
                    on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """Texts of one unit: text lines, chosen jsonl fields, or chosen parquet string columns."""
    if unit.kind == "text":
        yield from iter_range_lines(unit, stats, on_bytes)
        return
    if unit.kind == "jsonl":
        fields = list(columns) if columns else ["text"]
        line_no = 0
        for line in iter_range_lines(unit, stats, on_bytes):
            line_no += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                stats.skip(f"{unit.path}: line {line_no} of range at byte {unit.start}: bad JSON ({e})")
                continue
            if not isinstance(rec, dict):
                stats.skip(f"{unit.path}: line {line_no} of range at byte {unit.start}: not an object")
                continue
            for fld in fields:
                v = rec.get(fld)
                if isinstance(v, str):
                    yield v
                elif v is not None:
                    stats.skip(f"{unit.path}: line {line_no}: field {fld!r} is {type(v).__name__}, not text")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{unit.path}: no column(s) {', '.join(missing)}; columns are {', '.join(names)}")
        cols = list(columns)
    else:
        cols = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        if not cols:
            raise ValueError(f"{unit.path}: no text column; pass --columns (columns are {', '.join(names)})")
    table = pf.read_row_group(unit.row_group, columns=cols)
    for c in cols:
        for i, v in enumerate(table.column(c).to_pylist()):
            if isinstance(v, str):
                yield v
            elif v is not None:
                stats.skip(f"{unit.path}: row group {unit.row_group} row {i} column {c!r}: "
                           f"{type(v).__name__}, not text")
    if on_bytes:
        on_bytes(unit.size)


# --------------------------------------------------------------------------------------- processes
def _worker(wid: int, units: list[Unit], splitter: PieceSplitter, columns, max_pieces: int, seed: int,
            out_q) -> None:
    """Count a list of units and send the table back (progress messages on the way)."""
    try:
        table = PieceCounts(max_pieces, seed=seed + 1000 * (wid + 1))
        pending = [0]

        def on_bytes(n: int) -> None:
            pending[0] += n
            if pending[0] >= 1 << 20:
                out_q.put(("progress", wid, pending[0]))
                pending[0] = 0

        for u in units:
            count_texts(iter_unit_texts(u, columns, table.stats, on_bytes), splitter, table)
        if pending[0]:
            out_q.put(("progress", wid, pending[0]))
        table.thin(max_pieces // 2)  # send less
        out_q.put(("done", wid, table))
    except BaseException:  # report any failure to the parent instead of hanging it
        out_q.put(("error", wid, traceback.format_exc()))


def count_files(inputs, splitter: PieceSplitter, *, columns: Optional[Sequence[str]] = None,
                num_proc: int = 0, max_pieces: int = 1_000_000, seed: int = 0,
                show_progress: bool = True) -> PieceCounts:
    """Count the pieces of every input file with ``num_proc`` worker processes (0: one per CPU, at most 8)."""
    files = expand_inputs(inputs)
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    num_proc = num_proc or min(os.cpu_count() or 1, 8)
    total_bytes = sum(f.stat().st_size for f in files)
    num_proc = max(1, min(num_proc, total_bytes // MIN_BYTES_PER_PROCESS))  # small inputs: no process to start
    parts = plan_units(files, num_proc)
    total = sum(u.size for p in parts for u in p)
    table = PieceCounts(max_pieces, seed=seed)
    progress = progress_bar(bytes_done=True, disable=not show_progress)
    label = f"counting pieces ({len(files)} files, {len(parts)} processes)"
    if len(parts) == 1:  # no process to start
        with progress as bar:
            task = bar.add_task(label, total=total)
            for u in parts[0]:
                count_texts(iter_unit_texts(u, columns, table.stats, lambda n: bar.advance(task, n)),
                            splitter, table)
        return table
    # fork where there is one: no re-import of the caller's script (spawn needs an `if __name__ == "__main__"`
    # guard there); the workers only run pure-Python counting and the single-threaded pre-tokeniser.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, p, splitter, columns, max_pieces, seed, out_q), daemon=True)
             for i, p in enumerate(parts)]
    for p in procs:
        p.start()
    try:
        with progress as bar:
            task = bar.add_task(label, total=total)
            done = 0
            while done < len(procs):
                try:
                    kind, wid, payload = out_q.get(timeout=5)
                except queue_mod.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a counting process died with exit code {dead[0].exitcode} "
                                           f"(out of memory? lower --max_pieces or --num_proc)")
                    continue
                if kind == "progress":
                    bar.advance(task, payload)
                elif kind == "error":
                    raise RuntimeError(f"counting process {wid} failed:\n{payload}")
                else:
                    table.merge(payload)
                    del payload
                    done += 1
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return table


# ------------------------------------------------------------------------------------------ feeding
def char_frequencies(table: PieceCounts) -> Counter:
    """Weighted character counts of the table (which characters a small char-level vocabulary keeps)."""
    freq: Counter = Counter()
    for piece, w in table.counts.items():
        for ch in piece:
            freq[ch] += w
    return freq


def feed_batches(table: PieceCounts, scale: float = 1.0, seed: int = 0, batch_pieces: int = 100_000
                 ) -> Iterator[list[str]]:
    """The table as lists of pieces, each piece repeated by its (scaled) count.

    HF trainers take text only; a trainer with no normaliser and no pre-tokeniser takes each string as one
    word, so it sees exactly these pieces with these counts. ``scale`` > 1 divides every count (randomised
    rounding, unbiased) to bound the feeding time, which is about 4 microseconds per piece.
    """
    buf: list[str] = []
    for piece, c in table.integer_counts(scale, seed):
        buf.extend([piece] * c)
        if len(buf) >= batch_pieces:
            yield buf
            buf = []
    if buf:
        yield buf


def write_tsv(table: PieceCounts, path: str | Path, scale: float = 1.0, seed: int = 0) -> int:
    """The table as ``piece<TAB>count`` lines (sentencepiece's tsv input); tabs/newlines split pieces."""
    rows = 0
    merged: dict[str, int] = {}
    for piece, c in table.integer_counts(scale, seed):
        if "\t" in piece or "\n" in piece or "\r" in piece:
            for part in piece.replace("\r", "\n").replace("\t", "\n").split("\n"):
                if part:
                    merged[part] = merged.get(part, 0) + c
            continue
        merged[piece] = merged.get(piece, 0) + c
    with io.open(path, "w", encoding="utf-8") as f:
        for piece, c in merged.items():
            f.write(f"{piece}\t{c}\n")
            rows += 1
    return rows
