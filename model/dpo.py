"""Direct Preference Optimisation for the encoder-decoder chat model, on accelerate.

trl dropped encoder-decoder support from its ``DPOTrainer`` (0.29), so the objective lives here, written for T5:
the prompt is encoded ONCE per pair and the chosen and rejected responses are scored by the decoder in one
batch of ``2B`` rows. Reference log-probabilities come either from a frozen copy of the SFT model or, by default,
from one pass over the data before training (the reference model then leaves memory; for LoRA the reference is
simply the base model with the adapter switched off). Checkpoints follow the trainer's layout
(``output_dir/checkpoints/step-N``, written to a temporary folder and renamed), and ``is_keep_training`` continues
from the newest one at the exact next batch.

Losses (Rafailov et al. 2023; Azar et al. 2023), with ``h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl))``:

* ``sigmoid``: ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)`` (eps = label smoothing);
* ``ipo``: ``(h - 1 / (2 beta))^2`` on per-token mean log-probabilities, as in the IPO paper.

Implicit rewards are ``beta * (log pi(y) - log ref(y))`` of the same log-probabilities.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from config import EOS_ID, PAD_ID, DPOConfig

PREF_COLUMNS = ("prompt", "chosen", "rejected")
LOSS_TYPES = ("sigmoid", "ipo")
IGNORE = -100
TRAIN_STATE = "trainer_state.pt"


# ------------------------------------------------------------------------------------------------ data
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


# ---------------------------------------------------------------------------------------- objective
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over non-ignored positions, and their count, per row (computed in fp32)."""
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logits = logits.float()
    tok_logp = torch.gather(logits, 2, safe.unsqueeze(2)).squeeze(2) - torch.logsumexp(logits, dim=-1)
    return (tok_logp * mask).sum(-1), mask.sum(-1)


def pair_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the 2B responses in ``labels`` (chosen rows first) given B prompts.

    The encoder runs once on the B prompts; its output is repeated for the chosen and rejected halves.
    """
    bsz = input_ids.shape[0]
    if labels.shape[0] != 2 * bsz:
        raise ValueError(f"labels must have 2 x batch rows (chosen then rejected), got {labels.shape[0]} "
                         f"for a batch of {bsz}")
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    hidden = enc.last_hidden_state.repeat(2, 1, 1)
    mask2 = attention_mask.repeat(2, 1)
    dec_in = _shift_right(labels)
    out = model(encoder_outputs=(hidden,), attention_mask=mask2, decoder_input_ids=dec_in, use_cache=False,
                return_dict=True)
    return sequence_logps(out.logits, labels)


def _shift_right(labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs: [PAD] (the decoder start token) followed by the labels, ignored positions as [PAD]."""
    dec = labels.new_full(labels.shape, PAD_ID)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE, PAD_ID)


class PairScorer(nn.Module):
    """Wraps the policy so that one ``forward`` (the call DDP hooks into) runs encoder and decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return pair_logps(self.model, input_ids, attention_mask, labels)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected). Inputs are per-sequence log-probabilities
    (sums for ``sigmoid``, per-token means for ``ipo``: the caller picks, see ``DPOConfig.loss_type``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def reward_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict[str, float]:
    """The figures DPO runs are judged by (trl's names)."""
    margins = chosen_rewards - rejected_rewards
    return {"loss": losses.mean().item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logps/chosen": policy_chosen.detach().mean().item(),
            "logps/rejected": policy_rejected.detach().mean().item()}


def _as_objective(logp_sum: torch.Tensor, n_tok: torch.Tensor, loss_type: str) -> torch.Tensor:
    """IPO works on per-token mean log-probabilities; sigmoid DPO on sums."""
    return logp_sum / n_tok.clamp(min=1) if loss_type == "ipo" else logp_sum


# -------------------------------------------------------------------------------------- model helpers
def disable_dropout(model: nn.Module) -> None:
    """DPO compares policy and reference on the same tokens: dropout would add noise to the log-ratio."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if hasattr(model, "config") and hasattr(model.config, "dropout_rate"):
        model.config.dropout_rate = 0.0


def _target_modules(value) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    mods = [str(v) for v in value if str(v)]
    if not mods:
        raise ValueError("lora_target_modules is empty; e.g. --lora_target_modules=q,k,v,o")
    return mods


def add_lora(model: nn.Module, cfg: DPOConfig):
    """Wrap the model in a peft LoRA adapter (task SEQ_2_SEQ_LM): only adapter weights train."""
    from peft import LoraConfig, TaskType, get_peft_model
    lcfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=_target_modules(cfg.lora_target_modules))
    return get_peft_model(model, lcfg)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(adapter_dir: str | Path, output_dir: str | Path, base_model_dir: Optional[str | Path] = None) -> Path:
    """Fold a LoRA adapter into its base model and write a plain HF T5 folder (no peft needed to load it)."""
    from peft import PeftConfig, PeftModel

    from model.chat_model import TextToTextModel
    from model.checkpoint import check_model_folder, save_model_folder
    from model.tokenizer import load_tokenizer

    adir = Path(adapter_dir)
    if not (adir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adir} holds no adapter_config.json: pass the folder a LoRA DPO run wrote "
                                f"(dpo_train.py train --use_lora=True --output_dir=...)")
    base_dir = base_model_dir or PeftConfig.from_pretrained(str(adir)).base_model_name_or_path
    if not base_dir:
        raise ValueError(f"{adir}/adapter_config.json names no base model: pass --base_model_dir")
    base_dir = check_model_folder(base_dir)
    base = TextToTextModel.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adir)).merge_and_unload()
    tok_dir = adir if (adir / "tokenizer.json").is_file() else base_dir
    return save_model_folder(merged, load_tokenizer(tok_dir), output_dir)


# ------------------------------------------------------------------------------------- checkpoints
def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / TRAIN_STATE).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    dirs = _checkpoint_dirs(Path(output_dir))
    return dirs[-1] if dirs else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model, tokenizer, optimizer, scheduler, state: dict, output_dir: Path, keep_last_n: int) -> Path:
    """``checkpoints/step-N``: model (or adapter) + optimizer/scheduler/RNG/position, renamed into place."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}-{uuid.uuid4().hex[:8]}"
    _save_weights(model, tokenizer, tmp)
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state()}, tmp / TRAIN_STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(output_dir)[:-keep_last_n] if keep_last_n > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_weights(model, tokenizer, folder: Path) -> None:
    """Full model: a plain HF folder. LoRA: the peft adapter folder (+ tokenizer)."""
    if _is_peft(model):
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    else:
        from model.checkpoint import save_model_folder
        save_model_folder(model, tokenizer, folder)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def publish_final(model, tokenizer, output_dir: Path) -> None:
    """Write the final model files into ``output_dir`` next to ``checkpoints/`` and ``metrics.jsonl``:
    saved to a temporary sibling first, then each file renamed into place."""
    tmp = output_dir.parent / f".tmp-{output_dir.name}-final-{uuid.uuid4().hex[:8]}"
    _save_weights(model, tokenizer, tmp)
    output_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda x: x.suffix == ".safetensors"):  # weights land last
        os.replace(f, output_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ training
def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (str, Path)) and Path(p).exists():
            st = Path(p).stat()
            p = f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        h.update(str(p).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_reference_logps(ref_model, dataset: PreferenceDataset, batch_size: int, accelerator=None,
                            desc: str = "reference log-probs", show_progress: bool = True):
    """One pass of the reference model over ``dataset``; returns (chosen sums, rejected sums) of shape (N,).

    Each process scores its share of the pairs and the shares are gathered, so the cost is split across GPUs.
    """
    device = accelerator.device if accelerator is not None else next(ref_model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    n = len(dataset)
    was_training = ref_model.training
    ref_model.eval()
    lengths = dataset.lengths()
    order = sorted(range(n), key=lambda i: -lengths[i])
    mine = order[rank::world]
    out_idx, out_c, out_r = [], [], []
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    for b in _progress(batches, desc, enabled=show_progress and rank == 0):
        batch = collate_pairs([dataset[i] for i in b])
        with _autocast(accelerator):
            logp, _ = pair_logps(ref_model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 batch["labels"].to(device))
        out_idx.append(batch["idx"])
        out_c.append(logp[:len(b)].float().cpu())
        out_r.append(logp[len(b):].float().cpu())
    idx = torch.cat(out_idx) if out_idx else torch.zeros(0, dtype=torch.long)
    c = torch.cat(out_c) if out_c else torch.zeros(0)
    r = torch.cat(out_r) if out_r else torch.zeros(0)
    if world > 1:
        from accelerate.utils import gather_object
        parts = gather_object([(idx, c, r)])
        idx = torch.cat([p[0] for p in parts])
        c = torch.cat([p[1] for p in parts])
        r = torch.cat([p[2] for p in parts])
    chosen = torch.full((n,), float("nan"))
    rejected = torch.full((n,), float("nan"))
    chosen[idx] = c
    rejected[idx] = r
    if torch.isnan(chosen).any() or torch.isnan(rejected).any():
        raise RuntimeError("reference log-probabilities are missing for some pairs (or are NaN)")
    ref_model.train(was_training)
    return chosen, rejected


def _autocast(accelerator):
    return accelerator.autocast() if accelerator is not None else nullcontext()


def _progress(items, desc: str, enabled: bool = True):
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(desc, total=len(items))
        for it in items:
            yield it
            prog.advance(task)


class _RefScorer:
    """Reference log-prob sums for a batch: from the precomputed table, the adapter-less base (LoRA), or a
    frozen model copy."""

    def __init__(self, dataset: Optional[PreferenceDataset], frozen=None, peft_model=None, accelerator=None):
        self.dataset, self.frozen, self.peft_model, self.accelerator = dataset, frozen, peft_model, accelerator

    @torch.no_grad()
    def __call__(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        ds, bsz = self.dataset, batch["idx"].shape[0]
        if ds is not None and ds.ref_chosen is not None:
            idx = batch["idx"].cpu()  # the table stays on the CPU; only the batch's rows move
            return ds.ref_chosen[idx].to(device), ds.ref_rejected[idx].to(device)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        with _autocast(self.accelerator):
            if self.frozen is not None:
                logp, _ = pair_logps(self.frozen, *args)
            else:
                with self.peft_model.disable_adapter():
                    logp, _ = pair_logps(self.peft_model, *args)
        return logp[:bsz].float(), logp[bsz:].float()


@torch.no_grad()
def evaluate(model, dataset: PreferenceDataset, ref: _RefScorer, cfg: DPOConfig, accelerator=None,
             batch_size: Optional[int] = None) -> dict[str, float]:
    """Mean DPO metrics over a whole preference set (all pairs, each process its share, then gathered)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    was_training = model.training
    model.eval()
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])[rank::world]
    bs = batch_size or cfg.batch_size_per_gpu * 2
    rows = []
    for k in range(0, len(order), bs):
        batch = collate_pairs([dataset[i] for i in order[k:k + bs]])
        batch = {n: t.to(device) for n, t in batch.items()}
        b = batch["idx"].shape[0]
        with _autocast(accelerator):
            logp, ntok = pair_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        rc, rr = ref(batch, device)
        pc = _as_objective(logp[:b].float(), ntok[:b], cfg.loss_type)
        pr = _as_objective(logp[b:].float(), ntok[b:], cfg.loss_type)
        rc = _as_objective(rc, ntok[:b], cfg.loss_type)
        rr = _as_objective(rr, ntok[b:], cfg.loss_type)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        rows.append(torch.stack([losses, cr, rj, pc, pr], dim=1).float().cpu())
    local = torch.cat(rows) if rows else torch.zeros(0, 5)
    if world > 1:
        from accelerate.utils import gather_object
        local = torch.cat(gather_object([local]))
    model.train(was_training)
    losses, cr, rj, pc, pr = local.unbind(1)
    return reward_metrics(losses, cr, rj, pc, pr)


def _load_pairs(path: str, tokenizer, cfg: DPOConfig) -> PreferenceDataset:
    df, report = read_preference_file(path)
    return PreferenceDataset(df, tokenizer, cfg.max_source_len, cfg.max_target_len, source=str(path),
                             report=report)


def _mixed_precision(value: str) -> str:
    if value == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    return value


def _ref_logps_cached(ref_model, ds: PreferenceDataset, cfg: DPOConfig, data_file: str, split: str,
                      accelerator, out_dir: Path, ref_dir: str) -> None:
    """Fill ``ds.ref_chosen/ref_rejected``, reusing ``output_dir/ref_logps-<split>.pt`` when its fingerprint
    (model weights, data file, token budgets) matches, so a resumed run does not recompute them."""
    fp = _fingerprint(Path(ref_dir) / "model.safetensors", data_file, cfg.max_source_len, cfg.max_target_len,
                      len(ds))
    cache = out_dir / f"ref_logps-{split}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == fp:
            ds.ref_chosen, ds.ref_rejected = saved["chosen"], saved["rejected"]
            return
    ds.ref_chosen, ds.ref_rejected = compute_reference_logps(
        ref_model, ds, cfg.batch_size_per_gpu * 2, accelerator, desc=f"reference log-probs ({split})",
        show_progress=cfg.show_progress)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{uuid.uuid4().hex[:6]}")
        torch.save({"fingerprint": fp, "chosen": ds.ref_chosen, "rejected": ds.ref_rejected}, tmp)
        os.replace(tmp, cache)


def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO as configured; returns the eval figures before/after, step count and where the model went.

    The final model (full) or adapter (LoRA, plus a merged plain folder when ``merge_lora``) is written to
    ``cfg.output_dir``; metrics go to ``output_dir/metrics.jsonl``.
    """
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would drown the DPO progress
    try:
        return _train_dpo(cfg)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from transformers import get_scheduler

    from model.chat_model import TextToTextModel
    from model.checkpoint import check_model_folder
    from model.tokenizer import load_tokenizer

    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if cfg.num_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(cfg.num_threads)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    say = accelerator.print
    out_dir = Path(cfg.output_dir)
    sft_dir = check_model_folder(cfg.sft_model_dir)
    ref_dir = str(check_model_folder(cfg.ref_model_dir)) if cfg.ref_model_dir else str(sft_dir)
    tokenizer = load_tokenizer(sft_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_ds = _load_pairs(cfg.train_file, tokenizer, cfg)
    valid_ds = _load_pairs(cfg.valid_file, tokenizer, cfg) if cfg.valid_file else None
    say(f"[dpo] train pairs: {train_ds.report}" + (f"; valid pairs: {valid_ds.report}" if valid_ds else ""))

    resume = latest_checkpoint(out_dir) if cfg.is_keep_training else None
    if cfg.is_keep_training and resume is None:
        say(f"[dpo] --is_keep_training: no checkpoint under {out_dir}/checkpoints, starting from scratch")

    # Reference: a precomputed table (default), the base with the adapter switched off (LoRA), or a frozen
    # copy of the SFT (or --ref_model_dir) weights kept in memory next to the policy.
    lora_base_is_ref = cfg.use_lora and not cfg.ref_model_dir
    frozen = None
    if cfg.precompute_ref_logps or not lora_base_is_ref:
        ref_model = TextToTextModel.from_pretrained(ref_dir, dtype=torch.float32)
        disable_dropout(ref_model)
        ref_model.requires_grad_(False).eval().to(accelerator.device)
        if cfg.precompute_ref_logps:
            _ref_logps_cached(ref_model, train_ds, cfg, cfg.train_file, "train", accelerator, out_dir, ref_dir)
            if valid_ds is not None:
                _ref_logps_cached(ref_model, valid_ds, cfg, cfg.valid_file, "valid", accelerator, out_dir,
                                  ref_dir)
            del ref_model
        else:
            frozen = ref_model

    # Policy.
    if resume is not None and not cfg.use_lora:
        policy = TextToTextModel.from_pretrained(str(resume), dtype=torch.float32)
    else:
        policy = TextToTextModel.from_pretrained(str(sft_dir), dtype=torch.float32)
    disable_dropout(policy)
    if cfg.use_lora:
        if resume is not None:
            from peft import PeftModel
            policy = PeftModel.from_pretrained(policy, str(resume), is_trainable=True)
        else:
            policy = add_lora(policy, cfg)
        policy.peft_config["default"].base_model_name_or_path = str(sft_dir)

    params = [p for p in policy.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)

    world = accelerator.num_processes
    lengths = train_ds.lengths()
    n_batches = math.ceil(len(train_ds) / cfg.batch_size_per_gpu)
    micro_per_epoch = (n_batches // world) // cfg.gradient_accumulation_steps * cfg.gradient_accumulation_steps
    if micro_per_epoch == 0:
        raise ValueError(f"{cfg.train_file}: {len(train_ds)} pairs make fewer batches than "
                         f"{world} process(es) x {cfg.gradient_accumulation_steps} accumulation steps need; "
                         f"lower --batch_size_per_gpu or --gradient_accumulation_steps")
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_steps * total_steps) if cfg.warmup_steps < 1 else int(cfg.warmup_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    scorer = PairScorer(policy)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    unwrapped_policy = lambda: accelerator.unwrap_model(scorer).model  # noqa: E731

    step, epoch, micro_done = 0, 0, 0
    if resume is not None:
        st = torch.load(resume / TRAIN_STATE, weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        step, epoch, micro_done = st["step"], st["epoch"], st["micro_in_epoch"]
        say(f"[dpo] resumed from {resume} at step {step} (epoch {epoch}, batch {micro_done})")

    def ref_for(ds):
        return _RefScorer(ds, frozen=frozen, peft_model=unwrapped_policy() if cfg.use_lora else None,
                          accelerator=accelerator)

    from model.logging_utils import MetricsLogger
    # a fresh run starts the file afresh; a resumed one drops what a killed run logged after its checkpoint
    log = MetricsLogger(out_dir / "metrics.jsonl", resume_step=step if resume is not None else None,
                        overwrite=resume is None, enabled=main)
    eval_ds = valid_ds if valid_ds is not None else train_ds
    eval_split = "valid" if valid_ds is not None else "train"
    results: dict[str, Any] = {"train_report": train_ds.report,
                               "valid_report": valid_ds.report if valid_ds else None, "eval_split": eval_split}
    if resume is None:
        m0 = evaluate(unwrapped_policy(), eval_ds, ref_for(eval_ds), cfg, accelerator)
        results["eval_before"] = m0
        log.log(step=0, split="eval", eval_on=eval_split, **_prefixed(m0))
        say(f"[dpo] before: {eval_split} " + _fmt(m0))

    ref_train = ref_for(train_ds)
    accum = cfg.gradient_accumulation_steps
    window: list[dict] = []
    t0 = time.time()
    scorer.train()
    progress = _StepBar(total_steps, step, enabled=main and cfg.show_progress)
    try:
        while step < total_steps:
            batches = epoch_batches(lengths, cfg.batch_size_per_gpu, cfg.seed, epoch, cfg.group_by_length)
            batches = batches[:micro_per_epoch * world]
            mine = batches[accelerator.process_index::world][:micro_per_epoch]
            for k in range(micro_done, micro_per_epoch):
                if step >= total_steps:
                    break
                batch = collate_pairs([train_ds[i] for i in mine[k]])
                batch = {n: t.to(accelerator.device) for n, t in batch.items()}
                b = batch["idx"].shape[0]
                boundary = (k + 1) % accum == 0
                ctx = nullcontext() if boundary or world == 1 else accelerator.no_sync(scorer)
                with ctx:
                    with accelerator.autocast():
                        logp, ntok = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
                    rc, rr = ref_train(batch, accelerator.device)
                    pc = _as_objective(logp[:b].float(), ntok[:b], cfg.loss_type)
                    pr = _as_objective(logp[b:].float(), ntok[b:], cfg.loss_type)
                    losses, cr, rj = dpo_loss(pc, pr, _as_objective(rc, ntok[:b], cfg.loss_type),
                                              _as_objective(rr, ntok[b:], cfg.loss_type), cfg.beta,
                                              cfg.loss_type, cfg.label_smoothing)
                    accelerator.backward(losses.mean())  # divided by `accum` once, inside accelerate
                window.append(reward_metrics(losses, cr, rj, pc, pr))
                if not boundary:
                    continue
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                micro_done = k + 1
                progress.update(step, window[-1])
                if step % cfg.logging_steps == 0 or step == total_steps:
                    agg = _mean_dicts(window, accelerator)
                    log.log(step=step, split="train", epoch=epoch, lr=scheduler.get_last_lr()[0],
                            elapsed_s=round(time.time() - t0, 2), **agg)
                    window = []
                if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total_steps:
                    m = evaluate(unwrapped_policy(), eval_ds, ref_for(eval_ds), cfg, accelerator)
                    log.log(step=step, split="eval", eval_on=eval_split, **_prefixed(m))
                    say(f"[dpo] step {step}: {eval_split} " + _fmt(m))
                if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
                    _save_ckpt(accelerator, unwrapped_policy(), tokenizer, optimizer, scheduler, cfg, out_dir,
                               step, epoch, micro_done)
            else:
                epoch += 1
                micro_done = 0
    finally:
        progress.close()

    results["eval_after"] = evaluate(unwrapped_policy(), eval_ds, ref_for(eval_ds), cfg, accelerator)
    log.log(step=step, split="eval", eval_on=eval_split, final=True, **_prefixed(results["eval_after"]))
    say(f"[dpo] after {step} steps: {eval_split} " + _fmt(results["eval_after"]))
    if cfg.save_steps > 0 or cfg.is_keep_training:
        _save_ckpt(accelerator, unwrapped_policy(), tokenizer, optimizer, scheduler, cfg, out_dir, step, epoch,
                   micro_done)
    accelerator.wait_for_everyone()
    if main:
        publish_final(unwrapped_policy(), tokenizer, out_dir)
        _plot(out_dir)
        (out_dir / "dpo_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str) + "\n",
                                                 encoding="utf-8")
        if cfg.use_lora and cfg.merge_lora:
            results["merged_dir"] = str(merge_lora(out_dir, out_dir / "merged", base_model_dir=sft_dir))
    accelerator.wait_for_everyone()
    results.update(steps=step, output_dir=str(out_dir), train_time_s=round(time.time() - t0, 2))
    return results


def _prefixed(m: dict) -> dict:
    """Eval figures as ``eval/<name>`` so that curves and readers never mix them with training windows."""
    return {f"eval/{k}": v for k, v in m.items()}


def _plot(out_dir: Path) -> None:
    """Reward/margin/accuracy curves next to the metrics (skipped quietly if matplotlib is unusable)."""
    try:
        from model.plots import plot_curves
        plot_curves(out_dir / "metrics.jsonl", out_dir / "dpo_curves.png",
                    keys=["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                          "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"],
                    title="DPO")
    except Exception as e:  # a plot must never fail a finished training run
        print(f"[dpo] no curves plotted: {e}")


def _save_ckpt(accelerator, model, tokenizer, optimizer, scheduler, cfg, out_dir, step, epoch, micro_done):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(model, tokenizer, optimizer, scheduler,
                        {"step": step, "epoch": epoch, "micro_in_epoch": micro_done, "config": asdict(cfg)},
                        out_dir, cfg.keep_last_n)
    accelerator.wait_for_everyone()


def _mean_dicts(rows: list[dict], accelerator=None) -> dict[str, float]:
    keys = rows[0].keys()
    vals = torch.tensor([[r[k] for k in keys] for r in rows], dtype=torch.float64).mean(0)
    if accelerator is not None and accelerator.num_processes > 1:
        vals = accelerator.reduce(vals.to(accelerator.device), reduction="mean").cpu()
    return {k: round(float(v), 6) for k, v in zip(keys, vals)}


def _fmt(m: dict) -> str:
    return (f"loss {m['loss']:.4f}  reward acc {m['rewards/accuracies']:.3f}  margin {m['rewards/margins']:+.4f}"
            f"  (chosen {m['rewards/chosen']:+.4f}, rejected {m['rewards/rejected']:+.4f})")


class _StepBar:
    """A rich progress bar over optimizer steps showing the latest loss, accuracy and margin."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.prog = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.prog = Progress(TextColumn("[bold]dpo"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.prog.add_task("dpo", total=total, completed=done, info="")
            self.prog.start()

    def update(self, step: int, m: dict) -> None:
        if self.prog is not None:
            self.prog.update(self.task, completed=step,
                             info=f"loss {m['loss']:.3f} acc {m['rewards/accuracies']:.2f} "
                                  f"margin {m['rewards/margins']:+.3f}")

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()
