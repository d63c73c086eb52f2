"""Held-out quality in bits per character, and the character n-gram floors every run is judged by.

Bits per character (bpc) is the summed negative log-likelihood of the target tokens, in bits, divided by the
number of characters of the target text. It does not depend on the tokenizer, so runs with different
vocabularies compare directly, and it compares with two count models estimated on the same training text and
scored on the same held-out targets:

* **character unigram**, add-one (Laplace) smoothed over the training alphabet plus an end-of-text symbol and one
  shared symbol for every character never seen in training;
* **character bigram**, interpolated Kneser-Ney: absolute discount ``d = n1 / (n1 + 2 n2)`` (Ney's estimate from
  the counts of bigrams seen once and twice), backing off to add-one smoothed continuation counts. A text starts
  in a start context and ends with the end symbol, which both models must predict, as the neural model must
  predict ``[EOS]``.

Unseen characters share one symbol, which makes both floors slightly optimistic: a model that beats them beats
the fair versions too.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

START, END, UNSEEN = 0x110000, 0x110001, 0x110002  # beyond Unicode: no character collides with them
_BASE = 0x110003  # pair key = previous * _BASE + next


def bits_per_char(nll_nats: float, chars: int) -> float:
    """Summed NLL in nats over ``chars`` characters -> bits per character (inf when there is no text)."""
    return float(nll_nats / math.log(2) / chars) if chars > 0 else float("inf")


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[key] for each query key, 0 where the key is absent."""
    if len(sorted_keys) == 0:
        return np.zeros(len(query), dtype=values.dtype)
    pos = np.clip(np.searchsorted(sorted_keys, query), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == query, values[pos], 0)


class CharNgramBaselines:
    """Character unigram (add-one) and bigram (interpolated Kneser-Ney) models of a training text."""

    def __init__(self, texts: Iterable[str]):
        seqs = [np.concatenate(([START], _codes(t), [END])) for t in texts if t]
        if not seqs:
            raise ValueError("no training text to estimate the character baselines on")
        allc = np.concatenate(seqs)
        chars = allc[allc != START]  # every predicted symbol: characters and END
        self.alphabet, self.uni_counts = np.unique(chars, return_counts=True)
        self.total = int(self.uni_counts.sum())
        self.vocab = len(self.alphabet) + 1  # plus the one symbol every unseen character shares
        prev, nxt = allc[:-1], allc[1:]
        keep = nxt != START  # no pair across texts
        pairs, counts = np.unique(prev[keep] * _BASE + nxt[keep], return_counts=True)
        self.pairs, self.pair_counts = pairs, counts
        ctx, follow = pairs // _BASE, pairs % _BASE
        self.ctx, ctx_idx = np.unique(ctx, return_inverse=True)
        self.ctx_counts = np.bincount(ctx_idx, weights=counts).astype(np.int64)  # c(v)
        self.ctx_types = np.bincount(ctx_idx).astype(np.int64)  # N1+(v .)
        self.cont, cont_n = np.unique(follow, return_counts=True)  # N1+(. w)
        self.cont_counts = cont_n.astype(np.int64)
        self.cont_total = int(len(pairs))  # N1+(. .)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.75

    def _targets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(context, symbol) arrays for one held-out text, unseen characters mapped to UNSEEN."""
        seq = np.concatenate(([START], _codes(text), [END]))
        known = np.isin(seq, self.alphabet) | (seq == START)
        seq = np.where(known, seq, UNSEEN)
        return seq[:-1], seq[1:]

    def nll_bits(self, texts: Sequence[str]) -> dict:
        """Summed bits of each model over ``texts`` (characters plus the end symbol) and the character count."""
        pairs = [self._targets(t) for t in texts]
        ctx = np.concatenate([c for c, _ in pairs]) if pairs else np.zeros(0, np.int64)
        sym = np.concatenate([s for _, s in pairs]) if pairs else np.zeros(0, np.int64)
        uni = (_lookup(self.alphabet, self.uni_counts, sym) + 1.0) / (self.total + self.vocab)
        lower = (_lookup(self.cont, self.cont_counts, sym) + 1.0) / (self.cont_total + self.vocab)
        c_vw = _lookup(self.pairs, self.pair_counts, ctx * _BASE + sym).astype(np.float64)
        c_v = _lookup(self.ctx, self.ctx_counts, ctx).astype(np.float64)
        types_v = _lookup(self.ctx, self.ctx_types, ctx).astype(np.float64)
        seen = c_v > 0
        safe = np.where(seen, c_v, 1.0)
        bi = np.where(seen, np.maximum(c_vw - self.discount, 0.0) / safe
                      + self.discount * types_v / safe * lower, lower)
        chars = sum(len(t) for t in texts)
        return {"unigram_bits": float(-np.log2(uni).sum()), "bigram_bits": float(-np.log2(bi).sum()),
                "chars": int(chars), "texts": len(texts)}

    def bpc(self, texts: Sequence[str]) -> dict:
        """``{"unigram_bpc", "bigram_bpc", "chars", "texts", "discount"}`` on held-out ``texts``."""
        r = self.nll_bits(texts)
        c = max(r["chars"], 1)
        return {"unigram_bpc": r["unigram_bits"] / c, "bigram_bpc": r["bigram_bits"] / c, "chars": r["chars"],
                "texts": r["texts"], "discount": round(self.discount, 4), "alphabet": int(self.vocab)}


# ------------------------------------------------------------------------------------------ answers
DEGENERATE_SHARE = 0.30  # an answer is degenerate when one token makes up more than this share of it


def top_token_share(ids: Sequence[int]) -> float:
    """Share of the most frequent token in an answer's tokens (0 for an empty answer)."""
    if len(ids) == 0:
        return 0.0
    return float(np.unique(np.asarray(ids), return_counts=True)[1].max() / len(ids))


def is_degenerate(ids: Sequence[int]) -> bool:
    return top_token_share(ids) > DEGENERATE_SHARE


def distinct_n(answers: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of answers (token ids): 1.0 means nothing repeats."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


COPY_ONSET_NATS = 1.0  # the copy onset: the first point at which the copy loss is below this (DESIGN.md)


def copy_onset(rows: Sequence[dict]) -> Optional[int]:
    """The step of the first metrics row whose held-out copy loss is below ``COPY_ONSET_NATS`` (None: never)."""
    return next((r["step"] for r in rows if r.get("eval_copy_loss", float("inf")) < COPY_ONSET_NATS), None)
