"""Preference pairs (prompt, chosen, rejected) for DPO: reading with bad rows counted, tokenising with
truncation by tokens, padding, and the deterministic per-rank batch order that makes resuming exact."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from config import EOS_ID, PAD_ID

PREF_COLUMNS = ("prompt", "chosen", "rejected")
IGNORE = -100


def read_preference_file(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a prompt/chosen/rejected parquet; rows with missing or blank fields are skipped and counted."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"preference file {p} does not exist: build one with "
                                f"`python utils/dpo_data_process.py build` (or use data/demo/dpo.parquet)")
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise ValueError(f"{p}: not a readable parquet file ({e})") from e
    missing = [c for c in PREF_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {', '.join(missing)}; a preference file needs columns "
                         f"{', '.join(PREF_COLUMNS)} (has {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise ValueError(f"{p}: the file has no rows")
    df = df[list(PREF_COLUMNS)]
    bad = pd.Series(False, index=df.index)
    for c in PREF_COLUMNS:
        col = df[c]
        bad |= col.isna() | ~col.map(lambda v: isinstance(v, str) and bool(v.strip()))
    report = {"rows": int(len(df)), "skipped_empty": int(bad.sum())}
    if bad.all():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{p}: every row has an empty or non-string prompt/chosen/rejected (first: row {first})")
    return df[~bad].reset_index(drop=True), report


def _truncate(ids: list[int], limit: int, keep_eos: bool) -> list[int]:
    if len(ids) <= limit:
        return ids
    return ids[:limit - 1] + [EOS_ID] if keep_eos else ids[:limit]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised pairs, truncated by tokens (prompt keeps its ``[EOS]``); pairs whose responses become equal
    after truncation carry no preference signal and are dropped (counted in ``report``)."""

    def __init__(self, df: pd.DataFrame, tokenizer, max_source_len: int, max_target_len: int,
                 source: str = "data", report: Optional[dict] = None):
        self.report = dict(report or {"rows": len(df), "skipped_empty": 0})
        enc_p = tokenizer(list(df["prompt"]), add_special_tokens=True)["input_ids"]
        enc_c = tokenizer(list(df["chosen"]), add_special_tokens=True)["input_ids"]
        enc_r = tokenizer(list(df["rejected"]), add_special_tokens=True)["input_ids"]
        self.prompt, self.chosen, self.rejected = [], [], []
        truncated = same = 0
        for p, c, r in zip(enc_p, enc_c, enc_r):
            if len(p) > max_source_len or len(c) > max_target_len or len(r) > max_target_len:
                truncated += 1
            p = _truncate(p, max_source_len, keep_eos=True)
            c = _truncate(c, max_target_len, keep_eos=False)
            r = _truncate(r, max_target_len, keep_eos=False)
            if c == r:
                same += 1
                continue
            self.prompt.append(p)
            self.chosen.append(c)
            self.rejected.append(r)
        self.report.update(truncated=truncated, skipped_same_after_truncation=same, pairs=len(self.prompt))
        if not self.prompt:
            raise ValueError(f"{source}: no usable preference pairs left ({self.report})")
        self.ref_chosen: Optional[torch.Tensor] = None
        self.ref_rejected: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompt)

    def __getitem__(self, i: int) -> dict:
        return {"idx": i, "prompt": self.prompt[i], "chosen": self.chosen[i], "rejected": self.rejected[i]}

    def lengths(self) -> list[int]:
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompt, self.chosen, self.rejected)]


def collate_pairs(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad a batch: prompts with [PAD]; chosen and rejected labels to ONE length (they are decoded together)."""
    bsz = len(rows)
    s = max(len(r["prompt"]) for r in rows)
    t = max(max(len(r["chosen"]), len(r["rejected"])) for r in rows)
    input_ids = torch.full((bsz, s), PAD_ID, dtype=torch.long)
    attn = torch.zeros((bsz, s), dtype=torch.long)
    labels = torch.full((2 * bsz, t), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r["prompt"])] = torch.tensor(r["prompt"])
        attn[i, :len(r["prompt"])] = 1
        labels[i, :len(r["chosen"])] = torch.tensor(r["chosen"])
        labels[bsz + i, :len(r["rejected"])] = torch.tensor(r["rejected"])
    return {"idx": torch.tensor([r["idx"] for r in rows]), "input_ids": input_ids, "attention_mask": attn,
            "labels": labels}


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """Deterministic batches for one epoch: a seeded shuffle, then (optionally) sorting by length inside
    windows of 50 batches to cut padding, then a shuffle of the batch order. Same seed+epoch, same batches,
    which is what makes resuming at a batch exact."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        win = batch_size * 50
        order = [i for k in range(0, len(order), win)
                 for i in sorted(order[k:k + win], key=lambda j: -lengths[j])]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


@dataclass
class PairBatch:
    tensors: dict
    keys: list  # pair indices
    epoch: int


class PairBatches:
    """This rank's share of each epoch's batches, in a fixed order; ``state_dict`` is the position in it.

    Every rank gets the same number of batches per epoch (a multiple of the accumulation steps, the rest is
    dropped), so all ranks step together."""

    def __init__(self, ds: PreferenceDataset, batch_size: int, seed: int, group_by_length: bool, rank: int,
                 world: int, accumulation: int, source: str):
        self.ds, self.bs, self.seed, self.group = ds, batch_size, seed, group_by_length
        self.rank, self.world = rank, world
        self.lengths = ds.lengths()
        n_batches = -(-len(ds) // batch_size)
        self.batches_per_epoch = (n_batches // world) // accumulation * accumulation
        if self.batches_per_epoch == 0:
            raise ValueError(f"{source}: {len(ds)} pairs make fewer batches than {world} process(es) x "
                             f"{accumulation} accumulation steps need; lower --batch_size_per_gpu or "
                             f"--gradient_accumulation_steps")
        self.epoch, self.pos, self._plan = 0, 0, None

    def plan(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.lengths, self.bs, self.seed, epoch, self.group)
        return batches[:self.batches_per_epoch * self.world][self.rank::self.world][:self.batches_per_epoch]

    def next_batch(self) -> PairBatch:
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos, self._plan = self.epoch + 1, 0, None
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        idx = self._plan[self.pos]
        self.pos += 1
        return PairBatch(collate_pairs([self.ds[i] for i in idx]), list(idx), self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._plan = state["epoch"], state["pos"], None
