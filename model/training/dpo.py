"""Direct Preference Optimisation for the encoder-decoder chat model: the DPO objective of the one training
loop (:mod:`model.training.engine`), which brings checkpoints with exact resume, signals, logging and trackers.

trl dropped encoder-decoder support from its ``DPOTrainer`` (0.29), so the objective lives here, written for T5:
the prompt is encoded once per pair and the chosen and rejected responses are scored by the decoder in one
batch of ``2B`` rows (``TextToTextModel.pair_logps``). Reference log-probabilities come from one pass over the
data before training (default; the reference model then leaves memory), from a frozen copy of the SFT model, or,
for LoRA, from the base model with the adapter switched off.

Losses (Rafailov et al. 2023; Azar et al. 2023), with ``h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl))``:

* ``sigmoid``: ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)`` (eps = label smoothing);
* ``ipo``: ``(h - 1 / (2 beta))^2`` on per-token mean log-probabilities, as in the IPO paper.

Implicit rewards are ``beta * (log pi(y) - log ref(y))`` of the same log-probabilities.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from config import DPO_LOSS_TYPES, DPOConfig, asdict, unknown
from model.chat_model import TextToTextModel
from model.data.checkpoint import check_model_folder, save_model_folder
from model.training.engine import Objective, param_counts, planned_steps, run, write_json
from model.progress import track
from model.data.preference_data import PairBatches, PreferenceDataset, collate_pairs, read_preference_file
from model.tokenizer.build import load_tokenizer



# ---------------------------------------------------------------------------------------- objective
class PairScorer(nn.Module):
    """The module DDP wraps: one ``forward`` runs ``pair_logps`` of the policy (LoRA layers included)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return self.model.pair_logps(input_ids, attention_mask, labels)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected). Inputs are per-sequence log-probabilities
    (sums for ``sigmoid``, per-token means for ``ipo``: see :func:`as_objective`)."""
    if loss_type not in DPO_LOSS_TYPES:  # a direct caller's argument (a DPOConfig checked its own)
        raise unknown("loss_type", loss_type, DPO_LOSS_TYPES)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def as_objective(logp_sum: torch.Tensor, n_tok: torch.Tensor, loss_type: str) -> torch.Tensor:
    """IPO works on per-token mean log-probabilities; sigmoid DPO on sums."""
    return logp_sum / n_tok.clamp(min=1) if loss_type == "ipo" else logp_sum


FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def pair_figures(logp, ntok, ref_chosen, ref_rejected, cfg) -> torch.Tensor:
    """Per pair: loss, rewards (chosen, rejected, margin), accuracy, policy log-probs: one row per pair, in
    the order of FIGURES (the loss column keeps its graph)."""
    b = ref_chosen.shape[0]
    pc, pr = as_objective(logp[:b].float(), ntok[:b], cfg.loss_type), as_objective(logp[b:].float(), ntok[b:], cfg.loss_type)
    losses, cr, rj = dpo_loss(pc, pr, as_objective(ref_chosen, ntok[:b], cfg.loss_type),
                              as_objective(ref_rejected, ntok[b:], cfg.loss_type), cfg.beta, cfg.loss_type,
                              cfg.label_smoothing)
    return torch.stack([losses, cr, rj, cr - rj, (cr > rj).float(), pc.detach(), pr.detach()], dim=1)


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


def merge_lora(adapter_dir: str | Path, output_dir: str | Path, base_model_dir: Optional[str | Path] = None) -> Path:
    """Fold a LoRA adapter into its base model and write a plain HF T5 folder (no peft needed to load it)."""
    from peft import PeftConfig, PeftModel

    adir = Path(adapter_dir)
    if not (adir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adir} holds no adapter_config.json: pass the folder a LoRA DPO run wrote "
                                f"(dpo_train.py --use_lora=True --output_dir=...)")
    base_dir = base_model_dir or PeftConfig.from_pretrained(str(adir)).base_model_name_or_path
    if not base_dir:
        raise ValueError(f"{adir}/adapter_config.json names no base model: pass --base_model_dir")
    base_dir = check_model_folder(base_dir)
    base = TextToTextModel.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adir)).merge_and_unload()
    tok_dir = adir if (adir / "tokenizer.json").is_file() else base_dir
    return save_model_folder(merged, load_tokenizer(tok_dir), output_dir)



# ------------------------------------------------------------------------------------------ reference
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
    mine = sorted(range(n), key=lambda i: -lengths[i])[rank::world]
    idx, chosen_parts, rejected_parts = [], [], []
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    for b in track(batches, desc, enabled=show_progress and rank == 0):
        batch = collate_pairs([dataset[i] for i in b])
        with _autocast(accelerator):
            logp, _ = ref_model.pair_logps(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                           batch["labels"].to(device))
        idx.append(batch["idx"])
        chosen_parts.append(logp[:len(b)].float().cpu())
        rejected_parts.append(logp[len(b):].float().cpu())
    parts = [(torch.cat(idx), torch.cat(chosen_parts), torch.cat(rejected_parts))] if idx else []
    if world > 1:
        from accelerate.utils import gather_object
        parts = gather_object(parts)
    chosen, rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    for i, c, r in parts:
        chosen[i], rejected[i] = c, r
    if torch.isnan(chosen).any() or torch.isnan(rejected).any():
        raise RuntimeError("reference log-probabilities are missing for some pairs (or are NaN)")
    ref_model.train(was_training)
    return chosen, rejected


def _autocast(accelerator):
    return accelerator.autocast() if accelerator is not None else nullcontext()


class Reference:
    """Reference log-prob sums for a batch: from the precomputed table, the adapter-less base (LoRA), or a
    frozen model copy."""

    def __init__(self, frozen=None, peft_model=None, accelerator=None):
        self.frozen, self.peft_model, self.accelerator = frozen, peft_model, accelerator

    @torch.no_grad()
    def __call__(self, ds: PreferenceDataset, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        if ds.ref_chosen is not None:
            idx = batch["idx"].cpu()  # the table stays on the CPU; only the batch's rows move
            return ds.ref_chosen[idx].to(device), ds.ref_rejected[idx].to(device)
        args = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
        with _autocast(self.accelerator):
            if self.frozen is not None:
                logp, _ = self.frozen.pair_logps(*args)
            else:
                with self.peft_model.disable_adapter():
                    logp, _ = self.peft_model.pair_logps(*args)
        bsz = args[0].shape[0]
        return logp[:bsz].float(), logp[bsz:].float()


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (str, Path)) and Path(p).exists():
            st = Path(p).stat()
            p = f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        h.update(str(p).encode())
    return h.hexdigest()[:16]


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


def _load_pairs(path: str, tokenizer, cfg: DPOConfig) -> PreferenceDataset:
    df, report = read_preference_file(path)
    return PreferenceDataset(df, tokenizer, cfg.max_source_len, cfg.max_target_len, source=str(path),
                             report=report)


# ------------------------------------------------------------------------------------------ training
class DPOObjective(Objective):
    """Preference pairs: the DPO/IPO loss against a reference, summed over pairs (the loop averages)."""

    name = "dpo"
    eval_at_start = True

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def setup(self, trainer) -> None:
        from accelerate.utils import set_seed
        cfg, acc = self.cfg, trainer.acc
        self.sft_dir = check_model_folder(cfg.sft_model_dir)
        ref_dir = str(check_model_folder(cfg.ref_model_dir)) if cfg.ref_model_dir else str(self.sft_dir)
        self.tokenizer = load_tokenizer(self.sft_dir)
        set_seed(cfg.seed)
        self.train_ds = _load_pairs(cfg.train_file, self.tokenizer, cfg)
        self.valid_ds = _load_pairs(cfg.valid_file, self.tokenizer, cfg) if cfg.valid_file else None
        acc.print(f"[dpo] train pairs: {self.train_ds.report}"
                  + (f"; valid pairs: {self.valid_ds.report}" if self.valid_ds else ""))
        frozen = None
        if cfg.precompute_ref_logps or not (cfg.use_lora and not cfg.ref_model_dir):
            ref_model = TextToTextModel.from_pretrained(ref_dir, dtype=torch.float32)
            disable_dropout(ref_model)
            ref_model.requires_grad_(False).eval().to(acc.device)
            if cfg.precompute_ref_logps:
                for ds, f, split in ((self.train_ds, cfg.train_file, "train"), (self.valid_ds, cfg.valid_file, "valid")):
                    if ds is not None:
                        _ref_logps_cached(ref_model, ds, cfg, f, split, acc, trainer.out, ref_dir)
                del ref_model
            else:
                frozen = ref_model
        policy = TextToTextModel.from_pretrained(str(self.sft_dir), dtype=torch.float32)
        disable_dropout(policy)
        if cfg.use_lora:
            policy = add_lora(policy, cfg)
            policy.peft_config["default"].base_model_name_or_path = str(self.sft_dir)
        self.model = policy
        self.reference = Reference(frozen, policy if cfg.use_lora else None, acc)
        self.param_info = param_counts(policy)
        self.batches = PairBatches(self.train_ds, cfg.batch_size_per_gpu, cfg.seed, cfg.group_by_length,
                                   trainer.rank, trainer.world, max(1, cfg.gradient_accumulation_steps),
                                   cfg.train_file)
        self.total_steps = planned_steps(cfg, self.batches.batches_per_epoch)

    def module(self):
        return PairScorer(self.model)

    def count(self, batch) -> int:
        return len(batch.keys)

    def loss(self, module, batch, device):
        t = {k: v.to(device) for k, v in batch.tensors.items()}
        logp, ntok = module(t["input_ids"], t["attention_mask"], t["labels"])
        ref_c, ref_r = self.reference(self.train_ds, t, device)
        rows = pair_figures(logp, ntok, ref_c, ref_r, self.cfg)
        sums = rows.detach().sum(0).tolist()
        return rows[:, 0].sum(), dict(zip(FIGURES, sums), pairs=len(batch.keys))

    def summarise(self, sums: dict, seconds: float) -> dict:
        return {k: round(sums[k] / max(sums["pairs"], 1), 6) for k in FIGURES}

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        """Mean figures over the whole held-out set (or the training set when there is none), every pair
        once: each process scores its share, then they are gathered."""
        ds = self.valid_ds if self.valid_ds is not None else self.train_ds
        acc, module = trainer.acc, trainer.module  # the wrapped module: a sharded model gathers in its forward
        was_training = module.training
        module.eval()
        lengths = ds.lengths()
        order = sorted(range(len(ds)), key=lambda i: -lengths[i])
        rows = []
        for chunk, counted in trainer.eval_chunks(order[trainer.rank::trainer.world], order,
                                                  self.cfg.batch_size_per_gpu * 2):
            batch = {n: t.to(acc.device) for n, t in collate_pairs([ds[i] for i in chunk]).items()}
            with acc.autocast():
                logp, ntok = module(batch["input_ids"], batch["attention_mask"], batch["labels"])
            if counted:
                rows.append(pair_figures(logp, ntok, *self.reference(ds, batch, acc.device), self.cfg).float().cpu())
        local = torch.cat(rows) if rows else torch.zeros(0, len(FIGURES))
        if trainer.world > 1:
            from accelerate.utils import gather_object
            local = torch.cat(gather_object([local]))
        module.train(was_training)
        means = local.mean(0).tolist()
        return {"eval_on": "valid" if self.valid_ds is not None else "train",
                **{f"eval/{k}": round(v, 6) for k, v in zip(FIGURES, means)}}

    def finish(self, trainer, result: dict) -> dict:
        plain = lambda ev: {k[5:]: v for k, v in ev.items() if k.startswith("eval/")}  # noqa: E731
        if "eval_before" in result:
            result["eval_before"] = plain(result["eval_before"])
        result.update(eval_after=plain(trainer.last_eval), train_time_s=result["runtime_s"],
                      train_report=self.train_ds.report, valid_report=self.valid_ds.report if self.valid_ds else None,
                      eval_split="valid" if self.valid_ds is not None else "train")
        if result["interrupted"] or not trainer.is_main:
            return result
        write_json(trainer.out / "dpo_config.json", asdict(self.cfg))
        try:
            from model.training.plots import plot_curves
            plot_curves(trainer.out / "metrics.jsonl", trainer.out / "dpo_curves.png", title="DPO",
                        keys=["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                              "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"])
        except Exception as e:  # a plot must never fail a finished training run
            print(f"[dpo] no curves plotted: {e}")
        if self.cfg.use_lora and self.cfg.merge_lora:
            result["merged_dir"] = str(merge_lora(trainer.out, trainer.out / "merged", base_model_dir=self.sft_dir))
        return result


def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO as configured; returns the eval figures before/after, step count and where the model went.

    The final model (full) or adapter (LoRA, plus a merged plain folder when ``merge_lora``) is written to
    ``cfg.output_dir``; metrics go to ``output_dir/metrics.jsonl``.
    """
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would drown the DPO progress
    try:
        return run(cfg, DPOObjective(cfg))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
