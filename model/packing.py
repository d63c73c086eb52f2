"""Packed batches: several short examples share one row, so a CPU (or GPU) pays for few padding tokens.

Each row holds whole examples back to back on both sides: sources concatenated in the encoder row, targets in
the decoder row, each token tagged with its example's segment number (1, 2, ...; 0 is padding). Attention is
block-diagonal: encoder self-attention, decoder self-attention (also causal) and cross-attention each see only
their own example, and every example's decoder input starts with the decoder start token. T5's relative
position bias depends only on the distance between two tokens of the same example, which packing does not
change, so each example's loss equals its loss alone (``tests/test_packing.py``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from config import PAD_ID

IGNORE_INDEX = -100


def pack_rows(lengths: np.ndarray, max_source_len: int, max_target_len: int) -> list[list[int]]:
    """Indices of ``lengths`` ((n, 2): source and target tokens) grouped into rows that hold at most
    ``max_source_len`` source and ``max_target_len`` target tokens: first fit, longest examples first."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
    if len(lengths) == 0:
        return []
    size = np.maximum(lengths[:, 0] / max_source_len, lengths[:, 1] / max_target_len)
    order = np.argsort(-size, kind="stable")
    free_src = np.empty(len(lengths), dtype=np.int64)
    free_tgt = np.empty(len(lengths), dtype=np.int64)
    rows: list[list[int]] = []
    for i in order:
        s, t = lengths[i]
        n = len(rows)
        fits = np.flatnonzero((free_src[:n] >= s) & (free_tgt[:n] >= t)) if n else ()
        if len(fits):
            r = int(fits[0])
        else:
            r = n
            rows.append([])
            free_src[r], free_tgt[r] = max_source_len, max_target_len
        rows[r].append(int(i))
        free_src[r] -= s
        free_tgt[r] -= t
    return rows


def collate_packed(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]) -> dict:
    """Tensors for a batch of packed rows: ``input_ids``, ``attention_mask`` (real tokens), ``labels``,
    ``decoder_input_ids`` (shifted per example) and the segment numbers of both sides."""
    b = len(rows)
    s_len = max(sum(len(s) for s, _ in row) for row in rows)
    t_len = max(sum(len(t) for _, t in row) for row in rows)
    input_ids = np.full((b, s_len), PAD_ID, dtype=np.int64)
    labels = np.full((b, t_len), IGNORE_INDEX, dtype=np.int64)
    dec_in = np.full((b, t_len), PAD_ID, dtype=np.int64)
    src_seg = np.zeros((b, s_len), dtype=np.int64)
    tgt_seg = np.zeros((b, t_len), dtype=np.int64)
    for i, row in enumerate(rows):
        ps = pt = 0
        for k, (s, t) in enumerate(row, start=1):
            input_ids[i, ps: ps + len(s)] = s
            src_seg[i, ps: ps + len(s)] = k
            labels[i, pt: pt + len(t)] = t
            dec_in[i, pt + 1: pt + len(t)] = t[:-1]  # position pt keeps the decoder start token ([PAD])
            tgt_seg[i, pt: pt + len(t)] = k
            ps, pt = ps + len(s), pt + len(t)
    t = torch.from_numpy
    return {"input_ids": t(input_ids), "attention_mask": t((src_seg > 0).astype(np.int64)), "labels": t(labels),
            "decoder_input_ids": t(dec_in), "source_segments": t(src_seg), "target_segments": t(tgt_seg)}


def segment_masks(source_segments: torch.Tensor, target_segments: torch.Tensor, dtype: torch.dtype):
    """Additive 4D masks (0 where attention is allowed, the dtype's minimum elsewhere) for encoder
    self-attention, decoder self-attention (causal) and cross-attention.

    Padding positions form segment 0 and attend to each other, so no softmax row is empty; no real token
    attends to them."""
    low = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.tensor(low, dtype=dtype, device=allowed.device)).unsqueeze(1)

    t_len = target_segments.shape[1]
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=target_segments.device).tril()
    enc = source_segments[:, :, None] == source_segments[:, None, :]
    dec = (target_segments[:, :, None] == target_segments[:, None, :]) & causal
    cross = target_segments[:, :, None] == source_segments[:, None, :]
    return additive(enc), additive(dec), additive(cross)
