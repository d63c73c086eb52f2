"""The project's trainer (pretraining and SFT) on accelerate, and the same stages through transformers' Trainer.

Entry point for every stage: ``train(cfg: TrainConfig) -> dict``. What it fixes against the reference:

* exact resume: checkpoints hold model, optimizer, scheduler, RNG states, the step and each rank's data position
  (:mod:`model.dataset`), so a run killed after a checkpoint and continued with ``is_keep_training`` ends with
  the same weights as an uninterrupted one (bitwise on CPU);
* the LR schedule applies to every optimizer (Adafactor runs with an external LR, not ``relative_step``);
* gradient accumulation through ``accelerator.accumulate`` (no all-reduce on inner micro-steps), and the loss is
  weighted by target tokens over the whole accumulation window, divided once;
* checkpoints are written to a temporary folder and renamed into place; SIGINT/SIGTERM save and exit cleanly.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from config import TRAIN_PRESETS, TrainConfig, asdict, make_config

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
FREEZE_MODES = ("none", "decoder_only")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULERS = ("cosine", "onecycle", "constant")


def train_config(stage: Optional[str] = None, **overrides) -> TrainConfig:
    """A TrainConfig from a TRAIN_PRESETS stage (``pretrain``, ``sft``, ``demo_pretrain``...) plus overrides."""
    if stage is None and overrides.get("is_finetune"):
        stage = "sft"
    cfg = make_config(TrainConfig, stage, TRAIN_PRESETS, **overrides) if stage else \
        make_config(TrainConfig, **overrides)
    cfg.stage = stage
    return cfg


# --------------------------------------------------------------------------------------- components
def load_tokenizer_and_model(cfg: TrainConfig):
    """SFT (or ``init_from``): the pretrained folder's model and tokenizer; otherwise a fresh preset model."""
    from model.chat_model import TextToTextModel
    from model.tokenizer import load_tokenizer

    if cfg.is_finetune and not cfg.init_from:
        raise ValueError("--is_finetune=True needs --init_from=<pretrained model folder> (e.g. model_save/pretrain)")
    if cfg.init_from:
        from model.checkpoint import check_model_folder
        folder = check_model_folder(cfg.init_from)
        tokenizer = load_tokenizer(folder)
        extra = {} if cfg.dropout_rate is None else {"dropout_rate": cfg.dropout_rate}
        model = TextToTextModel.from_pretrained(str(folder), dtype=torch.float32, **extra)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer_dir)
        extra = {} if cfg.dropout_rate is None else {"dropout_rate": cfg.dropout_rate}
        model = TextToTextModel.from_preset(cfg.preset, vocab_size=len(tokenizer), **{**cfg.model_overrides, **extra})
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"model has {model.config.vocab_size} embeddings but the tokenizer {len(tokenizer)} ids")
    return tokenizer, model


def apply_freeze(model, mode: str) -> dict:
    """``decoder_only`` (the reference SFT): shared embeddings (tied to the LM head) and encoder frozen."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode {mode!r}; expected one of {', '.join(FREEZE_MODES)}")
    if mode == "decoder_only":
        for p in model.shared.parameters():
            p.requires_grad_(False)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}


def build_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if ("layer_norm" in name or name.endswith("bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        fused = torch.cuda.is_available() and not cfg.cpu
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 fused=fused or None, foreach=None if fused else True)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        # external LR: relative_step=False so the scheduler's LR is the one used (the reference's LR had none)
        return Adafactor(groups, lr=cfg.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    if cfg.optimizer == "sgd":  # plain SGD: an update is lr x gradient (tests compare gradients through it)
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")


def warmup_count(cfg: TrainConfig, total_steps: int) -> int:
    w = cfg.warmup_steps
    return int(round(w * total_steps)) if 0 <= w < 1 else int(w)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Warmup + cosine (to ``min_lr_ratio``), the reference's OneCycle, or warmup + constant."""
    warm = warmup_count(cfg, total_steps)
    if cfg.lr_scheduler == "onecycle":
        pct = min(max(warm / max(total_steps, 1), 0.01), 0.99)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps + 1,
            pct_start=pct, div_factor=cfg.div_factor, anneal_strategy="cos", cycle_momentum=False)
    if cfg.lr_scheduler not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {cfg.lr_scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    floor, cosine = cfg.min_lr_ratio, cfg.lr_scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete ``checkpoints/step-N`` (a folder being written is named ``.tmp-*`` and skipped)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def _move_into(src: Path, dest: Path) -> None:
    """Move a finished model folder's files into ``dest`` one by one (each an atomic rename), keeping the rest
    of ``dest`` (checkpoints/, metrics) in place."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dest / f.name
        if target.is_dir() and not f.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    shutil.rmtree(src, ignore_errors=True)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and returns. A second
    signal falls back to the default behaviour (an immediate stop)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, h in self._old.items():
            signal.signal(s, h)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Seq2SeqLoss(torch.nn.Module):
    """The T5 plus its loss, as one module for DDP/FSDP to wrap.

    Same computation as ``T5ForConditionalGeneration.forward`` with labels, except that the LM head and the
    softmax run only on target positions that count (padding positions cost nothing there), the decoder builds
    no KV cache, and it returns the *summed* loss and the token count so accumulation can weight by tokens.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        m = self.model
        enc = m.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        h = m.decoder(input_ids=m._shift_right(labels), encoder_hidden_states=enc,
                      encoder_attention_mask=attention_mask, use_cache=False, return_dict=True).last_hidden_state
        if getattr(m.config, "scale_decoder_outputs", m.config.tie_word_embeddings):
            h = h * (m.model_dim ** -0.5)
        keep = labels != -100
        logits = m.lm_head(h[keep])
        loss_sum = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return loss_sum, keep.sum()


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Pretraining / SFT loop on accelerate (one process, DDP, or the FSDP/DeepSpeed configs in configs/)."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        if cfg.num_threads and cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_scheduler", SCHEDULERS), ("freeze", FREEZE_MODES)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(allowed)}")
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if (torch.cuda.is_available() and not cfg.cpu and torch.cuda.is_bf16_supported()) else "no"
        self.out = Path(cfg.output_dir)
        log_with = None if cfg.log_with in (None, "", "none") else cfg.log_with
        self.accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=mp,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                       log_with=log_with, project_dir=str(self.out))
        acc = self.accelerator
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        from model.dataset import TextToTextDataset, make_batches, open_sources
        open_sources(cfg.train_file)  # a bad file fails here, before any model is built
        set_seed(cfg.seed)
        self.tokenizer, model = load_tokenizer_and_model(cfg)
        self.param_info = apply_freeze(model, cfg.freeze)
        set_seed(cfg.seed + self.rank)  # dropout differs between ranks; weights are broadcast by DDP anyway

        self.batches = make_batches(cfg, self.tokenizer, self.rank, self.world,
                                    show_progress=self.is_main and cfg.show_progress)
        skipped = getattr(getattr(self.batches, "ds", None), "skipped", {})
        if sum(skipped.values()):
            acc.print("skipped empty rows: " + ", ".join(f"{p}: {n}" for p, n in skipped.items() if n))
        self.valid = None
        if cfg.valid_file:
            self.valid = TextToTextDataset(cfg.valid_file, self.tokenizer, cfg.eval_max_source_len or cfg.max_source_len,
                                           cfg.eval_max_target_len or cfg.max_target_len,
                                           cfg.text_mode, cfg.noise_density, cfg.mean_noise_span_length,
                                           seed=cfg.seed, max_samples=cfg.max_eval_samples)
        self.valid_chars, self.baselines = 0, {}
        if self.valid is not None:
            targets = self.valid_target_texts()
            self.valid_chars = sum(len(t) for t in targets)
            if cfg.baselines and self.is_main:
                self.baselines = char_baselines(cfg.train_file, targets, self.out)
        ga = max(1, cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            max(1, int(math.ceil(cfg.epochs * self.batches.batches_per_epoch / ga)))
        optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, optimizer, self.total_steps)
        from accelerate.utils import DistributedType
        if acc.distributed_type == DistributedType.DEEPSPEED:  # no dataloader is prepared: say the batch size
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size_per_gpu
            if ds.get("gradient_clipping") == "auto":
                ds["gradient_clipping"] = cfg.max_grad_norm
        self.model, self.optimizer = acc.prepare(Seq2SeqLoss(model), optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.state = {"step": 0, "best_eval_loss": None, "best_step": None, "tokens": 0, "samples": 0,
                      "padded_tokens": 0}

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """All ranks: accelerate state + each rank's data state into ``.tmp-step-N``, then one rename."""
        acc, step = self.accelerator, self.state["step"]
        root = self.out / CHECKPOINT_DIR
        tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        with open(tmp / f"data_state_rank{self.rank}.pkl", "wb") as f:
            pickle.dump(self.batches.state_dict(), f, protocol=pickle.HIGHEST_PROTOCOL)
        acc.wait_for_everyone()
        if self.is_main:
            state = dict(self.state, world_size=self.world, total_steps=self.total_steps,
                         config=asdict(self.cfg))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, ensure_ascii=False), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(root)
        acc.wait_for_everyone()
        return final

    def _prune(self, root: Path) -> None:
        done = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        keep = set(done[-max(1, self.cfg.keep_last_n):])
        if self.state["best_step"] is not None:
            keep.add(root / f"step-{self.state['best_step']}")
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".tmp-step-*"):  # left by a kill during an earlier save
            shutil.rmtree(p, ignore_errors=True)

    def resume(self) -> Optional[Path]:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.accelerator.print(f"--is_keep_training: no checkpoint in {self.out / CHECKPOINT_DIR}; "
                                   f"starting from step 0")
            return None
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        if state["world_size"] != self.world:
            raise ValueError(f"{ckpt} was written by {state['world_size']} processes, this run has {self.world}: "
                             f"an exact resume needs the same number")
        data_file = ckpt / f"data_state_rank{self.rank}.pkl"
        if not data_file.is_file():
            raise FileNotFoundError(f"{data_file} is missing: the checkpoint is incomplete")
        self.accelerator.load_state(str(ckpt))
        with open(data_file, "rb") as f:
            self.batches.load_state_dict(pickle.load(f))
        self.state.update({k: state[k] for k in self.state if k in state})
        return ckpt

    def export(self, dest: Path) -> Path:
        """The model as a plain HF folder (config, generation config, safetensors, tokenizer) in ``dest``."""
        from accelerate.utils import DistributedType
        from model.checkpoint import save_model_folder
        acc = self.accelerator
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        state_dict = acc.get_state_dict(self.model) if sharded else None  # every rank must take part
        if self.is_main:
            model = self.inner_model()
            if state_dict is not None:
                model.load_state_dict({k[len("model."):]: v for k, v in state_dict.items()})
            tmp = dest.parent / f".export-{dest.name}-{uuid.uuid4().hex[:8]}"
            save_model_folder(model, self.tokenizer, tmp)
            _move_into(tmp, dest)
        acc.wait_for_everyone()
        return dest

    def skipped_rows(self) -> int:
        """Empty rows left out (in memory: at load; streaming: so far on this rank)."""
        if hasattr(self.batches, "ds"):
            return sum(self.batches.ds.skipped.values())
        return self.batches.st.skipped

    def inner_model(self):
        """The TextToTextModel inside the accelerate/DDP wrappers and the loss module."""
        return self.accelerator.unwrap_model(self.model).model

    # --------------------------------------------------------------------------------------- evaluation
    def valid_target_texts(self) -> list[str]:
        """The text of every validation target (what bits per character divide by)."""
        ds = self.valid
        return self.tokenizer.batch_decode([ds.pair(k)[1] for k in ds._keys0], skip_special_tokens=True)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss and perplexity over the validation set (token-weighted, all ranks), char BLEU on a sample."""
        from model.dataset import collate_pairs
        from model.metrics import char_bleu, perplexity
        from accelerate.utils import gather_object
        if self.valid is None:
            return {}
        acc, cfg, ds = self.accelerator, self.cfg, self.valid
        self.model.eval()
        keys = ds._keys0[self.rank::self.world]
        order = np.argsort(-ds.key_lengths(keys).sum(axis=1), kind="stable") if len(keys) else []
        keys = keys[order] if len(keys) else keys
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        n_tok = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i in range(0, len(keys), cfg.eval_batch_size):
            batch = collate_pairs([ds.pair(k) for k in keys[i: i + cfg.eval_batch_size]])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                batch_loss, n = self.model(**batch)
            loss_sum += batch_loss.double()
            n_tok += n
        loss_sum, n_tok = acc.reduce(loss_sum, "sum"), acc.reduce(n_tok, "sum")
        loss = float(loss_sum / n_tok.clamp(min=1))
        from model.quality import bits_per_char
        metrics = {"eval_loss": loss, "eval_ppl": perplexity(loss),
                   "eval_bpc": bits_per_char(float(loss_sum), self.valid_chars)}
        if cfg.bleu_samples > 0:
            from accelerate.utils import DistributedType
            if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                sample = ds._keys0[: cfg.bleu_samples][self.rank::self.world]
                pairs = [ds.pair(k) for k in sample]
                hyps, refs = [], []
                model = self.inner_model()
                for i in range(0, len(pairs), cfg.eval_batch_size):
                    chunk = pairs[i: i + cfg.eval_batch_size]
                    batch = collate_pairs(chunk)
                    with acc.autocast():
                        gen = model.my_generate(batch["input_ids"].to(acc.device),
                                                batch["attention_mask"].to(acc.device),
                                                max_seq_len=cfg.max_target_len, search_type="greedy")
                    hyps += self.tokenizer.batch_decode(gen, skip_special_tokens=True)
                    refs += self.tokenizer.batch_decode([t for _, t in chunk], skip_special_tokens=True)
                both = gather_object([(h, r) for h, r in zip(hyps, refs)])
                metrics["bleu"] = char_bleu([h for h, _ in both], [r for _, r in both])
                metrics["bleu_samples"] = len(both)
        self.model.train()
        return metrics

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from model.logging_utils import MetricsLogger

        cfg, acc = self.cfg, self.accelerator
        resumed = self.resume() if cfg.is_keep_training else None
        start = self.state["step"]
        metrics_path = self.out / "metrics.jsonl"
        logger = MetricsLogger(metrics_path, resume_step=start if resumed else None, overwrite=not resumed,
                               enabled=self.is_main)
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers("tb", config={k: v for k, v in asdict(cfg).items()
                                             if isinstance(v, (int, float, str, bool))})
        dump = None
        if cfg.debug_dump_samples:
            (self.out / "debug").mkdir(parents=True, exist_ok=True)
            dump = open(self.out / "debug" / f"samples_rank{self.rank}.jsonl", "a" if resumed else "w")
        if self.baselines:
            logger.log(step=start, **self.baselines)
            acc.print("held-out character baselines: unigram {baseline_unigram_bpc:.3f} bpc, bigram "
                      "{baseline_bigram_bpc:.3f} bpc".format(**self.baselines))
        acc.print(f"training {self.param_info['trainable_params']:,} of {self.param_info['params']:,} parameters, "
                  f"{self.world} process(es), {self.total_steps} steps"
                  + (f", resumed from {resumed}" if resumed else ""))
        ga = max(1, cfg.gradient_accumulation_steps)
        self.model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        window = {"loss": 0.0, "tok": 0, "in_tok": 0, "pad": 0, "t": time.perf_counter(), "steps": 0}
        last = {}
        stopped_by = None
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            disable=not (self.is_main and cfg.show_progress))
        with _StopFlag() as stop, progress:
            task = progress.add_task("train", total=self.total_steps, completed=start, info="")
            while self.state["step"] < self.total_steps:
                micro = [self.batches.next_batch() for _ in range(ga)]
                counts = [b.num_tokens() for b in micro]
                window_tgt = sum(c[1] for c in counts)
                grad_norm = None
                for b, (n_in, n_tgt) in zip(micro, counts):
                    with acc.accumulate(self.model):
                        batch = {k: v.to(acc.device, non_blocking=True) for k, v in b.tensors.items()}
                        loss_sum, _ = self.model(**batch)
                        # token-weighted over the window; accelerate divides by ga once, so multiply it back
                        acc.backward(loss_sum * (ga / window_tgt))
                        if acc.sync_gradients and cfg.max_grad_norm and cfg.max_grad_norm > 0:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    window["loss"] += float(loss_sum.detach())
                    window["pad"] += b.tensors["input_ids"].numel() + b.tensors["labels"].numel()
                    window["tok"] += n_tgt
                    window["in_tok"] += n_in
                    self.state["samples"] += len(b.keys)
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.state["step"] += 1
                step = self.state["step"]
                window["steps"] += 1
                if cfg.debug_signal and int(cfg.debug_signal.split(":")[0]) == step:
                    os.kill(os.getpid(), getattr(signal, cfg.debug_signal.split(":")[1]))
                if dump is not None:
                    dump.write(json.dumps({"step": step, "keys": [k for b in micro for k in b.keys]}) + "\n")
                    dump.flush()
                if _every(step, cfg.logging_steps) or step == self.total_steps or step == start + 1:
                    sums = acc.reduce(torch.tensor([window["loss"], window["tok"], window["in_tok"], window["pad"]],
                                                   dtype=torch.float64, device=acc.device), "sum")
                    dt = time.perf_counter() - window["t"]
                    loss = float(sums[0] / max(sums[1], 1))
                    self.state["tokens"] += int(sums[1] + sums[2])
                    self.state["padded_tokens"] += int(sums[3])
                    last = {"loss": loss, "lr": self.scheduler.get_last_lr()[0],
                            "tokens_per_s": float(sums[1] + sums[2]) / max(dt, 1e-9),
                            "epoch": micro[-1].epoch}
                    if grad_norm is not None:
                        last["grad_norm"] = float(grad_norm)
                    logger.log(step=step, **last)
                    if acc.log_with:
                        acc.log({"train/" + k: v for k, v in last.items()}, step=step)
                    progress.update(task, info=f"loss {loss:.4f} lr {last['lr']:.2e} "
                                               f"{last['tokens_per_s']:.0f} tok/s")
                    window = {"loss": 0.0, "tok": 0, "in_tok": 0, "pad": 0, "t": time.perf_counter(), "steps": 0}
                progress.update(task, completed=step)
                if self.valid is not None and (_every(step, cfg.eval_steps) or step == self.total_steps):
                    ev = self.evaluate()
                    logger.log(step=step, **ev)
                    if acc.log_with:
                        acc.log({"eval/" + k: v for k, v in ev.items()}, step=step)
                    last.update(ev)
                    best = self.state["best_eval_loss"]
                    if best is None or ev["eval_loss"] < best:
                        self.state["best_eval_loss"], self.state["best_step"] = ev["eval_loss"], step
                        if cfg.save_best:
                            self.export(self.out / "best")  # a plain HF folder, whatever save_steps is
                    acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                flag = torch.tensor([1.0 if stop.signum else 0.0], device=acc.device)
                if self.world > 1:
                    flag = acc.reduce(flag, "sum")
                if _every(step, cfg.save_steps) or (flag.item() > 0 and step < self.total_steps):
                    path = self.save_checkpoint()
                    if flag.item() > 0:
                        stopped_by = signal.Signals(stop.signum).name if stop.signum else "peer"
                        acc.print(f"{stopped_by}: saved {path}; continue with --is_keep_training=True")
                        break
        if dump is not None:
            dump.close()
        runtime, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = {"output_dir": str(self.out), "steps": self.state["step"], "total_steps": self.total_steps,
                  "train_tokens": self.state["tokens"], "train_samples": self.state["samples"],
                  "pad_share": round(1 - self.state["tokens"] / max(1, self.state["padded_tokens"]), 4),
                  "interrupted": stopped_by is not None, "runtime_s": round(runtime, 2),
                  "cpu_s": round(cpu, 2),
                  "best_step": self.state["best_step"], "best_eval_loss": self.state["best_eval_loss"],
                  **{k: v for k, v in last.items()}, **self.baselines, **self.param_info}
        if stopped_by is None:
            self.export(self.out)
            if self.is_main:
                (self.out / "train_result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
                try:
                    from model.plots import plot_curves
                    plot_curves(metrics_path, self.out / "loss_curve.png",
                                keys=["loss", "eval_loss", "eval_bpc", "lr", "bleu"])
                except Exception as e:  # a plot must never fail a finished run
                    acc.print(f"loss curve not drawn: {e}")
        result["skipped_rows"] = self.skipped_rows()
        result["param_checksum"] = param_checksum(self.inner_model())
        if cfg.debug_dump_samples:
            (self.out / "debug" / f"final_rank{self.rank}.json").write_text(json.dumps(result, default=str))
        if acc.log_with:
            acc.end_training()
        return result


def _every(step: int, interval: int) -> bool:
    """True every ``interval`` steps; an interval of 0 (or less) means off."""
    return interval > 0 and step % interval == 0


_FITTED_BASELINES: dict = {}  # training files' signature -> CharNgramBaselines (one fit per process)


def char_baselines(train_file: str, targets: list[str], out: Path) -> dict:
    """Character unigram/bigram bpc of the held-out targets, estimated on the run's training text.

    The fit is kept per process (a study runs many configs on one text) and the figures are cached in
    ``out/baselines.json`` under the training files' names, sizes and times and the targets, so a resumed run
    does not count again.
    """
    import hashlib
    from model.dataset import iter_source_rows, open_sources
    from model.quality import CharNgramBaselines
    sources = [s for s in open_sources(train_file) if s.weight > 0]
    signature = json.dumps([[s.path, os.path.getsize(s.path), os.path.getmtime(s.path)] for s in sources])
    key = hashlib.sha256(json.dumps([signature] + targets, ensure_ascii=False).encode()).hexdigest()
    cache = out / "baselines.json"
    if cache.is_file():
        got = json.loads(cache.read_text(encoding="utf-8"))
        if got.get("key") == key:
            return got["baselines"]

    def texts():
        for s in sources:
            for _, rows, _ in iter_source_rows(s, chunk=4096):
                for r in rows:
                    yield from (str(x) for x in r)

    t0 = time.perf_counter()
    if signature not in _FITTED_BASELINES:
        _FITTED_BASELINES.clear()
        _FITTED_BASELINES[signature] = CharNgramBaselines(texts())
    b = _FITTED_BASELINES[signature].bpc(targets)
    b = {"baseline_unigram_bpc": b["unigram_bpc"], "baseline_bigram_bpc": b["bigram_bpc"],
         "baseline_discount": b["discount"], "eval_chars": b["chars"], "baseline_s": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "baselines": b}, indent=1), encoding="utf-8")
    return b


def param_checksum(model) -> str:
    """A hash of every parameter's bytes: equal iff the weights are bitwise equal."""
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig) -> dict:
    """Run one training stage; returns its figures (steps, loss, eval loss/perplexity/BLEU, tokens/s...)."""
    world = 1
    try:
        trainer = Trainer(cfg)
        world = trainer.world
        return trainer.fit()
    finally:
        _reset_accelerate(world)


def _reset_accelerate(world: int) -> None:
    """Let one process run several stages (pipeline: pretrain then SFT) with fresh accelerate settings."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------- transformers' Seq2SeqTrainer
def hf_train(cfg: TrainConfig, reference_settings: bool = False, group_by_length: Optional[bool] = None,
             resume_from_checkpoint=None, report_to: Optional[str] = None, callbacks=None,
             data_collator=None) -> dict:
    """The same stage through ``Seq2SeqTrainer``: same dataset, collator, model code and (unless
    ``reference_settings``) the same optimizer and LR schedule as :func:`train`.

    ``reference_settings=True`` reproduces the reference's HF scripts for comparison: Adafactor, linear
    schedule, random sampling (no length grouping) unless ``group_by_length`` says otherwise.
    """
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from model.dataset import Seq2SeqCollator, StreamingTextToText, TextToTextDataset

    if cfg.num_threads and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_tokenizer_and_model(cfg)
    info = apply_freeze(model, cfg.freeze)
    common = dict(max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len, text_mode=cfg.text_mode,
                  noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length)
    if cfg.streaming:
        train_ds = StreamingTextToText(cfg.train_file, tokenizer, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                       group_by_length=False, **common)
    else:
        train_ds = TextToTextDataset(cfg.train_file, tokenizer, seed=cfg.seed, **common)
    valid_ds = TextToTextDataset(cfg.valid_file, tokenizer, seed=cfg.seed, max_samples=cfg.max_eval_samples,
                                 **common) if cfg.valid_file else None
    group = cfg.group_by_length if group_by_length is None else group_by_length
    mp = cfg.mixed_precision
    use_gpu = torch.cuda.is_available() and not cfg.cpu
    if mp == "auto":
        mp = "bf16" if use_gpu and torch.cuda.is_bf16_supported() else "no"
    if cfg.max_steps <= 0 and cfg.streaming:
        raise ValueError("streaming through transformers' Trainer needs --max_steps (the stream has no length)")
    args = dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size_per_gpu,
        per_device_eval_batch_size=cfg.eval_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.keep_last_n, seed=cfg.seed,
        eval_strategy="steps" if valid_ds is not None else "no", eval_steps=cfg.eval_steps,
        bf16=mp == "bf16", fp16=mp == "fp16", use_cpu=not use_gpu,
        report_to=report_to or ("none" if cfg.log_with in (None, "", "none") else cfg.log_with),
        train_sampling_strategy="group_by_length" if group else "random", remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers, disable_tqdm=not cfg.show_progress, save_safetensors=True,
        logging_dir=str(Path(cfg.output_dir) / "runs"),
    )
    optimizers = (None, None)
    if reference_settings:
        args.update(optim="adafactor", lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps)
    else:
        train_len = None if cfg.streaming else len(train_ds)
        per_epoch = None if train_len is None else math.ceil(train_len / cfg.batch_size_per_gpu)
        total = cfg.max_steps if cfg.max_steps > 0 else \
            max(1, math.ceil(cfg.epochs * per_epoch / max(1, cfg.gradient_accumulation_steps)))
        opt = build_optimizer(cfg, model)
        optimizers = (opt, build_scheduler(cfg, opt, total))
    import inspect
    known = set(inspect.signature(Seq2SeqTrainingArguments.__init__).parameters)
    targs = Seq2SeqTrainingArguments(**{k: v for k, v in args.items() if k in known})
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=valid_ds,
                             data_collator=data_collator or Seq2SeqCollator(cfg.pad_to_multiple_of),
                             processing_class=tokenizer,
                             optimizers=optimizers, callbacks=callbacks)
    if resume_from_checkpoint is None and cfg.is_keep_training:
        from transformers.trainer_utils import get_last_checkpoint
        resume_from_checkpoint = get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    result = dict(out.metrics, steps=trainer.state.global_step, output_dir=cfg.output_dir,
                  runtime_s=round(time.perf_counter() - t0, 2), **info)
    if valid_ds is not None:
        result.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        from model.checkpoint import save_model_folder
        dest = Path(cfg.output_dir)
        tmp = dest.parent / f".export-{dest.name}-{uuid.uuid4().hex[:8]}"
        save_model_folder(trainer.model, tokenizer, tmp)
        _move_into(tmp, dest)
    result["param_checksum"] = param_checksum(trainer.model)
    if trainer.args.world_size <= 1:
        _reset_accelerate(1)
    return result
