"""Exact and near-duplicate removal: numpy MinHash + LSH with exact Jaccard verification.

* Shingles are character n-grams (``ngram``, default 3) of the text as given; a text shorter than ``ngram`` is
  one shingle.  Each shingle is hashed to 32 bits with vectorised numpy (uint32 arithmetic) over the code points
  of a whole batch of texts at once.
* MinHash signatures (``num_perm`` values) use the permutations ``h -> a*h mod 2**32`` (random odd ``a``),
  computed for thousands of documents at once (one ``(num_perm, chunk)`` product and a segmented
  ``np.minimum.reduceat`` per chunk of shingles), in several processes for large batches.
* LSH: ``bands x rows`` chosen so that a pair at the threshold becomes a candidate with probability >= 0.99
  (16 x 8 for 128 permutations).  Only the band hashes are kept (compact signatures: ``bands`` uint32
  fingerprints per document); per band, one open-addressing numpy table maps a band fingerprint to the first
  document that had it, and one vectorised pass per batch both stores new fingerprints and returns the
  candidates (earlier batches and earlier in the same batch).
* Every candidate pair is verified with the exact Jaccard similarity of the two n-gram sets (exact integer codes
  of the n-grams, :func:`shingle_codes`), so reported pairs are true near-duplicates (precision) while the
  generous banding keeps recall high.  A document is a duplicate when it is identical to an earlier one (same
  string hash and equal text; found before any n-gram hashing) or has Jaccard >= threshold with an earlier
  document (kept or not).
* Several processes (``workers``) hash the next batch while the main process verifies the current one
  (:meth:`DropDatasetDuplicate.add_batches`).
* Streaming memory (:meth:`DropDatasetDuplicate.add_batch`): per document and per band one 8-byte slot (uint32
  fingerprint + uint32 id) in tables kept between 35% and 70% full, an 8-byte offset into a text spill file on
  disk (the texts, used to verify later candidates, stay on disk), and with ``exact=True`` a 12-byte slot for
  the text hash.  With 128 permutations (16 bands): 16 x 8 / load + 8 (+ 12 / load) = about 190-400 bytes per
  document whatever its length, so 10M documents need about 2-4 GB of RAM (the bench measures 190 B/doc at
  210k documents).
* :class:`ExactDeduper`: 64-bit xxh3 hashes in the same kind of numpy table (12 B/slot, 17-34 B per document).

The reference's API (``DropDatasetDuplicate(threshold, num_perm)``, ``add_doc(index, doc)``,
``get_duplicate_indexs()``) is kept.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import xxhash

__all__ = [
    "DropDatasetDuplicate", "ExactDeduper", "jaccard", "shingle_set", "choose_bands", "candidate_probability",
    "shingle_hashes", "shingle_codes", "minhash_signatures", "band_keys", "U64Table", "DedupResult",
]

_U32 = np.uint32
_U64 = np.uint64
_P1 = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for multiplicative hashing


# ------------------------------------------------------------------------------------------------ exact Jaccard
def shingle_set(text: str, ngram: int = 3) -> set[str]:
    if len(text) < ngram:
        return {text} if text else set()
    return {text[i:i + ngram] for i in range(len(text) - ngram + 1)}


def jaccard(a: str | set, b: str | set, ngram: int = 3) -> float:
    """Exact Jaccard similarity of the character n-gram sets of two texts (or of two given sets)."""
    sa = a if isinstance(a, set) else shingle_set(a, ngram)
    sb = b if isinstance(b, set) else shingle_set(b, ngram)
    if not sa and not sb:
        return 1.0
    inter = len(sa & sb)
    return inter / (len(sa) + len(sb) - inter)


# ------------------------------------------------------------------------------------------------ LSH parameters
def candidate_probability(j: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - j ** rows) ** bands


def choose_bands(num_perm: int, threshold: float, min_recall: float = 0.99) -> tuple[int, int]:
    """Largest ``rows`` (fewest false candidates) whose banding still catches a pair at ``threshold`` with
    probability >= ``min_recall``; ``bands = num_perm // rows``."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1:
            break
        if candidate_probability(threshold, bands, rows) >= min_recall:
            best = (bands, rows)
    return best


# ------------------------------------------------------------------------------------------------ hashing
_H1, _H2, _H3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser (a bijection), in place."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _mults(ngram: int) -> list:
    rng = np.random.default_rng(12345)
    base = [_H1, _H2, _H3]
    extra = [np.uint32(int(x) | 1) for x in rng.integers(1, 2 ** 32, max(0, ngram - 3), dtype=np.uint64)]
    return (base + extra)[:ngram]


def shingle_hashes(texts: Sequence[str], ngram: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character n-gram of every text, vectorised over all texts at once.

    ``h = fmix32(sum_k cp[i+k] * M_k  mod 2**32)`` over the code points ``cp`` of the concatenated texts (windows
    that cross a border between texts are masked out).  Returns ``(hashes, offsets)``: the shingles of text ``i``
    are ``hashes[offsets[i]:offsets[i+1]]``.  A text shorter than ``ngram`` (and not empty) has one shingle, the
    whole text.
    """
    n = len(texts)
    lengths = np.array(list(map(len, texts)), dtype=np.int64)
    offsets = np.zeros(n + 1, np.int64)
    if n == 0 or lengths.sum() == 0:
        return np.zeros(0, _U32), offsets
    cp = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=_U32)
    total_cp = cp.size
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nsh = np.where(lengths >= ngram, lengths - ngram + 1, (lengths > 0).astype(np.int64))
    np.cumsum(nsh, out=offsets[1:])
    total = int(offsets[-1])
    mult = _mults(ngram)
    m = total_cp - ngram + 1  # window starts over the concatenation (windows crossing a border are masked)
    if m > 0:
        h = cp[0:m] * mult[0]
        for k in range(1, ngram):
            h += cp[k:k + m] * mult[k]
        valid = np.ones(m, bool)
        for k in range(1, ngram):
            idx = ends - k
            ok = (idx >= starts) & (idx < m)
            valid[idx[ok]] = False
        long_vals = _fmix32(h[valid])
        long_vals[long_vals == 0] = 1  # 0 is fixed by every a*h permutation
    else:
        long_vals = np.zeros(0, _U32)
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if not short.size:
        return long_vals, offsets
    out = np.empty(total, _U32)
    cpp = np.concatenate([cp, np.zeros(ngram, _U32)])
    hs = np.full(short.size, 0x5BD1E995, _U32)  # keeps whole-text shingles apart from n-grams
    for k in range(ngram):
        hs += np.where(k < lengths[short], cpp[starts[short] + k], 0).astype(_U32) * mult[k]
    slot = np.zeros(total, bool)
    slot[offsets[short]] = True
    hs = _fmix32(hs)
    hs[hs == 0] = 1
    out[slot] = hs
    out[~slot] = long_vals
    return out, offsets


def shingle_codes(texts: Sequence[str], ngram: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Exact uint64 codes of every character n-gram (vectorised), for verification.

    For ``ngram <= 3`` the code packs the code points (21 bits each), so two n-grams have the same code exactly
    when they are equal; a text shorter than ``ngram`` gets its own code with bit 63 set.  For longer n-grams
    the code is a 64-bit polynomial hash (a collision has probability about 2**-64).  Same layout as
    :func:`shingle_hashes`."""
    n = len(texts)
    lengths = np.array(list(map(len, texts)), dtype=np.int64)
    offsets = np.zeros(n + 1, np.int64)
    if n == 0 or lengths.sum() == 0:
        return np.zeros(0, _U64), offsets
    cp = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=_U32).astype(_U64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nsh = np.where(lengths >= ngram, lengths - ngram + 1, (lengths > 0).astype(np.int64))
    np.cumsum(nsh, out=offsets[1:])
    total = int(offsets[-1])
    exact = ngram <= 3

    def combine(h, c):
        if exact:
            h <<= np.uint64(21)
            h |= c
        else:
            h *= _P1
            h += c + np.uint64(1)
        return h

    m = cp.size - ngram + 1
    if m > 0:
        h = cp[0:m].copy()
        for k in range(1, ngram):
            h = combine(h, cp[k:k + m])
        valid = np.ones(m, bool)
        for k in range(1, ngram):
            idx = ends - k
            ok = (idx >= starts) & (idx < m)
            valid[idx[ok]] = False
        long_vals = h[valid]
    else:
        long_vals = np.zeros(0, _U64)
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if not short.size:
        return long_vals, offsets
    cpp = np.concatenate([cp, np.zeros(ngram, _U64)])
    hs = np.zeros(short.size, _U64)
    for k in range(ngram):
        hs = combine(hs, np.where(k < lengths[short], cpp[starts[short] + k], np.uint64(0)).astype(_U64))
    hs |= np.uint64(1) << np.uint64(63)
    out = np.empty(total, _U64)
    slot = np.zeros(total, bool)
    slot[offsets[short]] = True
    out[slot] = hs
    out[~slot] = long_vals
    return out, offsets


def _perm_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = (rng.integers(1, 2 ** 32, num_perm, dtype=np.uint64) | np.uint64(1)).astype(_U32)
    b = rng.integers(0, 2 ** 32, num_perm, dtype=np.uint64).astype(_U32)
    return a, b


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray | None = None,
                       chunk: int = 4096) -> np.ndarray:
    """``(n_docs, num_perm)`` uint32 MinHash signatures; documents without shingles get all-ones rows.

    Permutation ``i`` maps a shingle hash ``h`` to ``a_i * h (+ b_i) mod 2**32`` (``a_i`` odd, so it is a
    bijection of the 32-bit hashes).  The shingles are processed in slices of ``chunk``: one
    ``(num_perm, chunk)`` uint32 product and a segmented minimum per document (``np.minimum.reduceat``); a
    document cut by a slice border is combined with ``np.minimum``.  ``b=None`` (the default in
    :class:`DropDatasetDuplicate`) skips the addition: 40% faster, same estimates (shingle hashes are never 0,
    the one value every ``a_i * h`` fixes)."""
    n = len(offsets) - 1
    k = len(a)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    if nonempty.size == 0:
        return np.full((n, k), 0xFFFFFFFF, dtype=_U32)
    d_start = offsets[nonempty]
    d_end = offsets[nonempty + 1]
    total = int(offsets[-1])
    sig_ne = np.empty((nonempty.size, k), dtype=_U32)
    a_col = a[:, None]
    b_col = b[:, None] if b is not None else None
    prod = np.empty((k, chunk), dtype=_U32)
    for s0 in range(0, total, chunk):
        s1 = min(s0 + chunk, total)
        w = s1 - s0
        lo = int(np.searchsorted(d_end, s0, side="right"))  # first doc ending after s0
        hi = int(np.searchsorted(d_start, s1, side="left"))  # docs starting before s1
        seg_starts = d_start[lo:hi] - s0
        cont = seg_starts[0] < 0  # the first doc started in an earlier slice
        if cont:
            seg_starts[0] = 0
        p = prod[:, :w]
        np.multiply(a_col, hashes[s0:s1][None, :], out=p)
        if b_col is not None:
            p += b_col
        mins = np.minimum.reduceat(p, seg_starts, axis=1).T
        if cont:
            np.minimum(sig_ne[lo], mins[0], out=sig_ne[lo])
            sig_ne[lo + 1:hi] = mins[1:]
        else:
            sig_ne[lo:hi] = mins
    if nonempty.size == n:
        return sig_ne
    sig = np.full((n, k), 0xFFFFFFFF, dtype=_U32)
    sig[nonempty] = sig_ne
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int, empty: np.ndarray | None = None) -> np.ndarray:
    """``(n_docs, bands)`` uint32 band fingerprints (never 0; 0 marks a document without shingles)."""
    n = sig.shape[0]
    s = sig[:, : bands * rows].reshape(n, bands, rows)
    h = np.broadcast_to((np.arange(1, bands + 1, dtype=_U32) * _H3), (n, bands)).copy()
    for j in range(rows):
        h ^= s[:, :, j]
        h *= _H1
        h ^= h >> np.uint32(15)
    out = _fmix32(h)
    out[out == 0] = 1
    if empty is not None and empty.any():
        out[empty] = 0
    return out


def _compute_band_keys(texts: Sequence[str], ngram: int, a: np.ndarray, b: np.ndarray | None, bands: int,
                       rows: int) -> np.ndarray:
    """``(n, bands)`` band keys of the texts."""
    hashes, offsets = shingle_hashes(texts, ngram)
    sig = minhash_signatures(hashes, offsets, a, b)
    return band_keys(sig, bands, rows, empty=offsets[1:] == offsets[:-1])


_WORKER: dict = {}


def _worker_init(ngram, a, b, bands, rows):
    _WORKER.update(ngram=ngram, a=a, b=b, bands=bands, rows=rows)


def _worker_band_keys(texts: list[str]) -> np.ndarray:
    w = _WORKER
    return _compute_band_keys(texts, w["ngram"], w["a"], w["b"], w["bands"], w["rows"])


def _pair_jaccards(pairs: list[tuple[str, str]], ngram: int) -> np.ndarray:
    """Exact n-gram Jaccard of each (text, text) pair (identical texts: 1.0)."""
    out = np.empty(len(pairs), np.float64)
    flat = [t for p in pairs for t in p]
    codes, offs = shingle_codes(flat, ngram)
    for k, (x, y) in enumerate(pairs):
        if x == y:
            out[k] = 1.0
            continue
        sa = set(codes[offs[2 * k]:offs[2 * k + 1]].tolist())
        sb = set(codes[offs[2 * k + 1]:offs[2 * k + 2]].tolist())
        inter = len(sa & sb)
        union = len(sa) + len(sb) - inter
        out[k] = inter / union if union else 1.0
    return out


def _worker_jaccards(pairs: list[tuple[str, str]]) -> np.ndarray:
    return _pair_jaccards(pairs, _WORKER["ngram"])


# ------------------------------------------------------------------------------------------------ hash tables
class U64Table:
    """Open-addressing (linear probing) numpy hash table with vectorised batch operations.

    Keys are non-zero unsigned integers (``key_dtype`` uint32 or uint64; 0 marks an empty slot); values are
    uint32.  The home slot is derived from the key alone, so the table can grow.  ``insert`` only inserts
    absent keys (the first occurrence in a batch wins) and tells which keys were already there.
    """

    def __init__(self, key_dtype=np.uint64, capacity_log2: int = 12, max_load: float = 0.7,
                 with_values: bool = True):
        self.key_dtype = np.dtype(key_dtype)
        self.max_load = max_load
        self.with_values = with_values
        self._alloc(capacity_log2)
        self.size = 0

    def _alloc(self, c: int):
        self.c = c
        self.mask = np.int64((1 << c) - 1)
        self.keys = np.zeros(1 << c, self.key_dtype)
        self.vals = np.zeros(1 << c, np.uint32) if self.with_values else None
        # claim scratch for batch inserts: the values array itself when there is one (overwritten by the winners'
        # values right after), else a small array indexed like the table
        self.claim = self.vals if self.with_values else np.zeros(1 << c, np.uint32)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.vals.nbytes if self.vals is not None else 0)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = keys.astype(_U64) * _P1
        return (h >> np.uint64(64 - self.c)).astype(np.int64)

    def _grow_for(self, extra: int):
        need = self.size + extra
        if need <= self.max_load * (1 << self.c):
            return
        c = self.c
        while need > self.max_load * (1 << c):
            c += 1
        old_keys, old_vals = self.keys, self.vals
        occ = np.flatnonzero(old_keys)
        self._alloc(c)
        self.size = 0
        self._insert(old_keys[occ], old_vals[occ] if old_vals is not None else None)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values for ``keys`` (int64), -1 where absent (and for key 0)."""
        keys = np.asarray(keys, self.key_dtype)
        res = np.full(keys.shape[0], -1, np.int64)
        present = self._insert(keys, None, res if self.vals is not None else None, write=False)
        if self.vals is None:
            res[present] = 1
        return res

    def insert(self, keys: np.ndarray, vals: np.ndarray | None = None) -> np.ndarray:
        """Insert absent keys; returns a bool mask: True where the key was present before (in the table or
        earlier in this batch)."""
        keys = np.asarray(keys, self.key_dtype)
        self._grow_for(int(np.count_nonzero(keys)))
        return self._insert(keys, vals)

    def get_or_insert(self, keys: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """One pass: for each key, the value already stored under it (from the table or from an earlier key of
        this batch), or -1 where this call inserted it with its own value."""
        keys = np.asarray(keys, self.key_dtype)
        self._grow_for(int(np.count_nonzero(keys)))
        found = np.full(keys.shape[0], -1, np.int64)
        self._insert(keys, vals, found)
        return found

    def _insert(self, keys: np.ndarray, vals: np.ndarray | None, found: np.ndarray | None = None,
                write: bool = True) -> np.ndarray:
        """Linear probing for every key at once; ``write=False`` only looks (an empty slot ends the search)."""
        present = np.zeros(keys.shape[0], bool)
        active = np.flatnonzero(keys)
        pos = self._home(keys)
        while active.size:
            p = pos[active]
            slot = self.keys[p]
            hit = slot == keys[active]
            present[active[hit]] = True
            if found is not None and hit.any():
                found[active[hit]] = self.vals[p[hit]]
            empty = slot == 0
            done = hit | (empty if not write else False)
            if write and empty.any():
                e_idx = np.flatnonzero(empty)
                pe, ae = p[e_idx], active[e_idx]
                # several keys may claim one empty slot: write in reverse order so that the earliest one is
                # written last and wins, then read the claims back (no sort needed)
                self.keys[pe[::-1]] = keys[ae[::-1]]
                self.claim[pe[::-1]] = ae[::-1]
                won = self.claim[pe] == ae
                win = e_idx[won]
                if self.vals is not None and vals is not None:
                    self.vals[pe[won]] = vals[ae[won]]
                self.size += len(win)
                done[win] = True
            advance = ~(hit | empty)
            nxt = active[advance]
            pos[nxt] = (pos[nxt] + 1) & self.mask
            active = active[~done]
        return present


# ------------------------------------------------------------------------------------------------ exact dedup
def text_hash64(text: str) -> int:
    h = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))
    return h or 1


class ExactDeduper:
    """Exact duplicates by 64-bit xxh3 hash in a numpy set (about 17-34 bytes per distinct text)."""

    def __init__(self):
        self.table = U64Table(np.uint64, with_values=False)

    def add_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Bool mask: True for texts seen before (earlier batches or earlier in this batch)."""
        if not len(texts):
            return np.zeros(0, bool)
        keys = np.fromiter((text_hash64(t) for t in texts), dtype=np.uint64, count=len(texts))
        return self.table.insert(keys)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


# ------------------------------------------------------------------------------------------------ text store
class _DiskTextStore:
    """Append-only spill file of texts, addressed by document id (8 bytes of RAM per document)."""

    def __init__(self, directory: str | None = None):
        fd, self.path = tempfile.mkstemp(prefix="dedup_texts_", suffix=".bin", dir=directory)
        self.fd = fd
        self.end = 0
        self.offsets = np.zeros(1 << 12, np.int64)  # text i is bytes offsets[i] .. offsets[i+1]
        self.n = 0

    def append(self, texts: Sequence[str], keep: np.ndarray):
        """Write the kept texts as UTF-32 (one encode per batch, offsets without scanning; 4 bytes a character
        on disk); dropped ones get an empty record."""
        n = len(texts)
        need = self.n + n + 1
        if need > self.offsets.size:
            new = np.zeros(max(need, self.offsets.size * 2), np.int64)
            new[: self.n + 1] = self.offsets[: self.n + 1]
            self.offsets = new
        kept = [t if k else "" for t, k in zip(texts, keep)]
        lens = np.array(list(map(len, kept)), np.int64) * 4
        self.offsets[self.n + 1: self.n + 1 + n] = self.end + np.cumsum(lens)
        data = "".join(kept).encode("utf-32-le", "surrogatepass")
        if data:
            os.pwrite(self.fd, data, self.end)
        self.end += len(data)
        self.n += n

    def get(self, i: int) -> str:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return os.pread(self.fd, e - s, s).decode("utf-32-le", "surrogatepass") if e > s else ""

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes

    def close(self):
        if self.fd is None:  # closing twice must not close a descriptor number reused by another file
            return
        fd, self.fd = self.fd, None
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _MemoryTextStore:
    def __init__(self):
        self.texts: list[str] = []

    def append(self, texts, keep):
        self.texts.extend(t if k else "" for t, k in zip(texts, keep))

    def get(self, i):
        return self.texts[i]

    nbytes = 0

    def close(self):
        self.texts = []


# ------------------------------------------------------------------------------------------------ main class
@dataclass
class DedupResult:
    duplicates: np.ndarray  # indices (in input order) of documents to drop
    pairs: list = field(default_factory=list)  # (earlier index, duplicate index, exact jaccard)
    candidates: int = 0  # candidate pairs verified


class _Done:
    """A finished result with the ``AsyncResult.get`` interface."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class DropDatasetDuplicate:
    """Near-duplicate removal with MinHash LSH (numpy, multi-process) and exact Jaccard verification.

    >>> d = DropDatasetDuplicate(threshold=0.85, num_perm=128)
    >>> dup = d.add_batch(["今天天气很好，我们去公园散步吧", "今天天气很好，我们去公园散步吧！", "完全不同的一句话"])
    >>> dup.tolist()
    [False, True, False]

    ``add_batch`` can be called repeatedly (streaming): a document is a duplicate when it is identical to an
    earlier one (``exact=True``: found by its string hash, confirmed by comparing the texts, no hashing or LSH
    work for it) or when its exact n-gram Jaccard with an
    earlier document (kept, or earlier in the same batch) is >= ``threshold``.  Kept texts are
    spilled to a file (``store="disk"``, bounded RAM) or kept in a list (``store="memory"``).
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, ngram: int = 3, bands: int | None = None,
                 rows: int | None = None, seed: int = 1, workers: int = 1, verify: bool = True,
                 store: str = "disk", store_dir: str | None = None, min_recall: float = 0.99,
                 parallel_min_docs: int = 20000, record_pairs: bool = False, exact: bool = True):
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        if bands is None or rows is None:
            bands, rows = choose_bands(num_perm, threshold, min_recall)
        if bands * rows > num_perm:
            raise ValueError(f"bands*rows ({bands}*{rows}) > num_perm ({num_perm})")
        self.bands, self.rows = bands, rows
        self.a, _ = _perm_params(num_perm, seed)
        self.b = None  # permutations h -> a*h mod 2**32 (see minhash_signatures)
        self.workers = max(1, int(workers))
        self.verify = verify
        self.parallel_min_docs = parallel_min_docs
        self.record_pairs = record_pairs
        self.tables = [U64Table(np.uint32, capacity_log2=12) for _ in range(bands)]
        self.store = _DiskTextStore(store_dir) if store == "disk" else _MemoryTextStore()
        self.n_docs = 0
        self.n_candidates = 0
        self.n_exact = 0
        self.exact = U64Table(np.uint64, capacity_log2=12) if exact else None  # str hash -> first id
        self._next_base = 0
        self._inflight: dict[int, Sequence[str]] = {}
        self.pairs: list[tuple[int, int, float]] = []
        self._pool = None
        self._pending: list[tuple[object, str]] = []
        self._dup_indexes: set = set()

    # ---------------------------------------------------------------- internals
    def _pool_get(self):
        if self._pool is None:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            self._pool = ctx.Pool(self.workers, initializer=_worker_init,
                                  initargs=(self.ngram, self.a, self.b, self.bands, self.rows))
        return self._pool

    def compute_band_keys(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), bands)`` uint32 band fingerprints, in ``workers`` processes for large batches."""
        if len(texts) == 0:
            return np.zeros((0, self.bands), _U32)
        if self.workers > 1 and len(texts) >= self.parallel_min_docs:
            size = math.ceil(len(texts) / self.workers)
            chunks = [list(texts[i:i + size]) for i in range(0, len(texts), size)]
            return np.concatenate(self._pool_get().map(_worker_band_keys, chunks), axis=0)
        return _compute_band_keys(texts, self.ngram, self.a, self.b, self.bands, self.rows)

    @property
    def index_nbytes(self) -> int:
        """RAM held by the streaming index (band tables + text offsets)."""
        return sum(t.nbytes for t in self.tables) + self.store.nbytes + (self.exact.nbytes if self.exact else 0)

    def _candidates(self, keys: np.ndarray, base: int) -> np.ndarray:
        """Sorted unique (doc, earlier doc) pairs packed as ``doc << 32 | earlier`` (global ids).

        Per band, one pass over the table stores each new band key with the first document that has it and
        returns, for every other document, that first document (from an earlier batch or earlier in this one)."""
        n = keys.shape[0]
        parts = []
        gid = np.arange(base, base + n, dtype=np.int64)
        ids32 = gid.astype(np.uint32)
        for band in range(self.bands):
            found = self.tables[band].get_or_insert(keys[:, band], ids32)
            hit = found >= 0
            if hit.any():
                parts.append((gid[hit] << 32) | found[hit])
        if not parts:
            return np.zeros(0, np.int64)
        packed = np.unique(np.concatenate(parts))
        return packed[(packed >> 32) != (packed & 0xFFFFFFFF)]

    def _verify(self, texts: Sequence[str], base: int, packed: np.ndarray) -> np.ndarray:
        """Exact Jaccard of each candidate pair, in document order; a document is a duplicate at its first
        candidate at or above the threshold.  The n-grams of all documents involved are coded at once
        (:func:`shingle_codes`); sets are built from those integer codes."""
        n = len(texts)
        dup = np.zeros(n, bool)
        if packed.size == 0:
            return dup
        docs = (packed >> 32).tolist()
        cands = (packed & 0xFFFFFFFF).tolist()
        gids = sorted(set(docs) | set(cands))
        pos = {g: k for k, g in enumerate(gids)}
        gtexts = [texts[g - base] if g >= base else self.store.get(g) for g in gids]
        codes, offs = shingle_codes(gtexts, self.ngram) if self.verify else (None, None)
        sets: dict[int, set] = {}

        def get_set(k: int) -> set:
            st = sets.get(k)
            if st is None:
                st = set(codes[offs[k]:offs[k + 1]].tolist())
                sets[k] = st
            return st

        for d, c in zip(docs, cands):
            i = d - base
            if dup[i] or c == d:
                continue
            self.n_candidates += 1
            if self.verify:
                kd, kc = pos[d], pos[c]
                if gtexts[kd] == gtexts[kc]:
                    j = 1.0
                else:
                    sa, sb = get_set(kd), get_set(kc)
                    inter = len(sa & sb)
                    union = len(sa) + len(sb) - inter
                    j = inter / union if union else 1.0
                ok = j >= self.threshold
            else:
                j, ok = float("nan"), True
            if ok:
                dup[i] = True
                if self.record_pairs:
                    self.pairs.append((c, d, j))
        return dup

    # ---------------------------------------------------------------- streaming API
    def add_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Add a batch of documents; returns a bool mask, True for (exact or near) duplicates of earlier
        documents."""
        if len(texts) == 0:
            return np.zeros(0, bool)
        base, first, todo = self._prepare(texts)
        keys = np.zeros((len(texts), self.bands), _U32)
        if todo.size:  # exact copies need no hashing and no LSH work
            keys[todo] = self.compute_band_keys([texts[i] for i in todo.tolist()])
        return self._add_with_keys(texts, keys, first, base)

    def add_batches(self, batches: Iterable[Sequence[str]]) -> Iterable[np.ndarray]:
        """:meth:`add_batch` over an iterable of batches, yielding each batch's mask (same results).  With
        ``workers > 1`` the worker processes hash the next batch and verify the candidate pairs of the current
        one while this process does the table lookups."""
        it = iter(batches)
        if self.workers <= 1:
            for b in it:
                yield self.add_batch(b)
            return
        yield from self._add_batches_parallel(it)

    def _add_batches_parallel(self, it) -> Iterable[np.ndarray]:
        """Three stages in flight: the workers hash batch k+1 and verify the candidate pairs of batch k while
        this process looks up batch k's band keys (tables and text store do not depend on verification: every
        document's keys and text are stored)."""
        pool = self._pool_get()
        w = self.workers

        def split(items):
            size = max(1, math.ceil(len(items) / w))
            return [items[i:i + size] for i in range(0, len(items), size)]

        def submit_hash(texts):
            if texts is None:
                return None
            base, first, todo = self._prepare(texts)  # in order: batch k is prepared before batch k+1
            sub = [texts[i] for i in todo.tolist()]
            return pool.map_async(_worker_band_keys, split(sub)), texts, base, first, todo

        def finish(job):
            texts, base, first, docs, cands, res = job
            n = len(texts)
            dup = np.zeros(n, bool)
            if res is not None:
                jac = np.concatenate(res.get()) if docs else np.zeros(0)
                self.n_candidates += len(docs)
                for d, c, j in zip(docs, cands, jac.tolist()):
                    i = d - base
                    if not dup[i] and j >= self.threshold:
                        dup[i] = True
                        if self.record_pairs:
                            self.pairs.append((c, d, j))
            self._mark_exact(dup, first, base)
            self._inflight.pop(base, None)
            return dup

        hashing = submit_hash(next(it, None))
        verifying = None
        while hashing is not None:
            res, texts, base, first, todo = hashing
            parts = res.get()
            hashing = submit_hash(next(it, None))
            keys = np.zeros((len(texts), self.bands), _U32)
            if todo.size:
                keys[todo] = np.concatenate(parts, axis=0)
            assert base == self.n_docs
            packed = self._candidates(keys, base)
            docs = (packed >> 32).tolist()
            cands = (packed & 0xFFFFFFFF).tolist()
            self.store.append(texts, np.ones(len(texts), bool))
            self.n_docs += len(texts)
            pairs = [(texts[d - base], texts[c - base] if c >= base else self._text(c)) for d, c in zip(docs, cands)]
            vres = pool.map_async(_worker_jaccards, split(pairs)) if (pairs and self.verify) else None
            if not self.verify and pairs:
                vres = _Done([np.ones(len(pairs))])
            job = (texts, base, first, docs, cands, vres)
            if verifying is not None:
                yield finish(verifying)
            verifying = job
        if verifying is not None:
            yield finish(verifying)

    def _prepare(self, texts: Sequence[str]) -> tuple[int, np.ndarray, np.ndarray]:
        """Give the batch its ids and find exact copies: (base id, id of the first identical earlier document
        or -1, indices of the documents that still need hashing).

        Exact copies are found by Python's string hash in a numpy table, then confirmed by comparing the texts
        (so no hash collision can drop a document); a copy of a dropped document is dropped too."""
        n = len(texts)
        base = self._next_base
        self._next_base += n
        self._inflight[base] = texts
        first = np.full(n, -1, np.int64)
        if self.exact is not None and n:
            h = np.fromiter(map(hash, texts), dtype=np.int64, count=n).view(_U64)
            h = np.where(h == 0, np.uint64(1), h)
            found = self.exact.get_or_insert(h, np.arange(base, base + n, dtype=np.uint32))
            for i in np.flatnonzero(found >= 0).tolist():
                g = int(found[i])
                if self._text(g) == texts[i]:
                    first[i] = g
        return base, first, np.flatnonzero(first < 0)

    def _text(self, g: int) -> str:
        for b, t in self._inflight.items():
            if b <= g < b + len(t):
                return t[g - b]
        return self.store.get(g)

    def _mark_exact(self, dup: np.ndarray, first: np.ndarray, base: int) -> None:
        """Mark exact copies (``first``: the id of the earlier identical text, or -1) as duplicates, in place."""
        ex = first >= 0
        if ex.any():
            if self.record_pairs:
                for i in np.flatnonzero(ex & ~dup).tolist():
                    self.pairs.append((int(first[i]), base + i, 1.0))
            dup |= ex
            self.n_exact += int(ex.sum())

    def _add_with_keys(self, texts: Sequence[str], keys: np.ndarray, first: np.ndarray, base: int) -> np.ndarray:
        n = len(texts)
        assert base == self.n_docs, "batches must be processed in the order they were prepared"
        dup = self._verify(texts, base, self._candidates(keys, base))
        if first is not None:
            self._mark_exact(dup, first, base)
        # every text is stored: a dropped document can still be the first holder of a band key that a later
        # document meets, and is then verified against
        self.store.append(texts, np.ones(n, bool))
        self._inflight.pop(base, None)
        self.n_docs += n
        return dup

    def find_duplicates(self, texts: Sequence[str], batch_size: int | None = None) -> DedupResult:
        """Batch convenience: indices of near-duplicates in ``texts`` (earliest copy kept) and the pairs."""
        rec = self.record_pairs
        self.record_pairs = True
        start_pairs = len(self.pairs)
        base = self.n_docs
        cand0 = self.n_candidates
        batch_size = batch_size or max(len(texts), 1)
        masks = [self.add_batch(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        mask = np.concatenate(masks) if masks else np.zeros(0, bool)
        pairs = [(a - base, b - base, j) for a, b, j in self.pairs[start_pairs:]]
        self.record_pairs = rec
        if not rec:
            del self.pairs[start_pairs:]
        return DedupResult(np.flatnonzero(mask), pairs, self.n_candidates - cand0)

    # ---------------------------------------------------------------- reference API
    def add_doc(self, index: object, doc: str) -> None:
        """Reference-compatible: queue one document (processed in batches of 4096)."""
        self._pending.append((index, doc))
        if len(self._pending) >= 4096:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        idx, docs = zip(*self._pending)
        self._pending = []
        mask = self.add_batch(list(docs))
        self._dup_indexes.update(i for i, m in zip(idx, mask) if m)

    def get_duplicate_indexs(self) -> set:
        """Reference-compatible: the indexes passed to :meth:`add_doc` that are near-duplicates."""
        self._flush()
        return set(self._dup_indexes)

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
