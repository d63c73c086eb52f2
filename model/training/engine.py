"""The one training loop. A stage brings an objective (its model, batches, loss, evaluation and export); the
loop does the rest the same way for every stage: accumulation, clipping, precision, LR schedule, logging
(JSON lines, TensorBoard, a rich bar), evaluation, best-model export, checkpoints with exact resume, and
SIGINT/SIGTERM that save before stopping.

Objectives: ``model.training.trainer.Seq2SeqObjective`` (pretraining, SFT, the IE fine-tune) and
``model.training.dpo.DPOObjective`` (preference optimisation, full or LoRA).
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from config import asdict
from model.chat_model import optimizer_groups
from model.data.checkpoint import latest_checkpoint, load_run_state, publish_model, save_run_state
from model.logging_utils import MetricsLogger
from model.progress import progress_bar

CPU_AUTO_BF16 = False  # precision `auto` on a CPU with native bf16 (docs/training.md "Precision on a CPU")


class Objective:
    """What a stage brings to the loop. ``batches`` yields objects with ``tensors`` (a dict), ``epoch`` and
    ``keys``, and has ``state_dict``/``load_state_dict`` (its position, for exact resume)."""

    name = "train"
    best_metric: Optional[str] = None  # an eval figure whose minimum is exported to output_dir/best
    eval_at_start = False  # evaluate before the first update (DPO: the "before" figures)
    model: nn.Module  # the trainable model
    tokenizer: Any
    batches: Any
    total_steps: int

    def setup(self, trainer: "Trainer") -> None:
        """Build ``model``, ``tokenizer``, ``batches``, ``total_steps`` and ``param_info`` (the accelerator and
        this process's rank are ready in ``trainer``)."""
        raise NotImplementedError

    def started(self, trainer: "Trainer", logger) -> None:
        """Called once the loop starts (after a resume), e.g. to log baselines."""

    def module(self) -> nn.Module:
        """The module that DDP/FSDP wraps: its ``forward`` runs the whole model once per micro-batch."""
        raise NotImplementedError

    def count(self, batch) -> int:
        """What the loss is averaged over in this micro-batch (target tokens, pairs)."""
        raise NotImplementedError

    def loss(self, module, batch, device) -> tuple[torch.Tensor, dict]:
        """(the loss SUMMED over the batch's ``count`` units, sums of figures to log)."""
        raise NotImplementedError

    def summarise(self, sums: dict, seconds: float) -> dict:
        """Logged figures from the sums of a logging window (already added over ranks)."""
        raise NotImplementedError

    def evaluate(self, trainer: "Trainer") -> dict:
        return {}

    def finish(self, trainer: "Trainer", result: dict) -> dict:
        return result


# -------------------------------------------------------------------------------------- components
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (flags ``avx512_bf16`` or ``amx_bf16``). torch's own check can say
    yes where bf16 is only emulated, and emulated bf16 autocast runs many times slower than fp32."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(value: str, cpu: bool = False) -> str:
    """``auto``: bf16 where the GPU has it; on a CPU, bf16 where it is native (:func:`cpu_has_native_bf16`) and
    ``CPU_AUTO_BF16`` says the measured gain holds; otherwise full precision."""
    if value != "auto":
        return value
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if CPU_AUTO_BF16 and cpu_has_native_bf16() else "no"


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    """AdamW (fused on GPU), Adafactor with an external LR (the schedule applies), or plain SGD."""
    groups = optimizer_groups(model, cfg.weight_decay)
    name = cfg.optimizer
    if name == "adamw":
        fused = torch.cuda.is_available() and not cfg.cpu
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 fused=fused or None, foreach=None if fused else True)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(groups, lr=cfg.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    # sgd: an update is lr x gradient (tests compare gradients through it); the config checked the name
    return torch.optim.SGD(groups, lr=cfg.learning_rate)


def planned_steps(cfg, batches_per_epoch: int) -> int:
    """Optimizer updates of a run: ``max_steps`` when > 0, else ``epochs`` passes of ``batches_per_epoch``
    micro-batches (per process) at ``gradient_accumulation_steps`` micro-batches per update, at least 1."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, int(math.ceil(cfg.epochs * batches_per_epoch / max(1, cfg.gradient_accumulation_steps))))


def warmup_count(cfg, total_steps: int) -> int:
    w = cfg.warmup_steps
    return int(round(w * total_steps)) if 0 <= w < 1 else int(w)


def build_scheduler(cfg, optimizer, total_steps: int):
    """Warmup, then cosine (to ``min_lr_ratio``), linear (to 0) or constant; or OneCycle."""
    warm = warmup_count(cfg, total_steps)
    kind = cfg.lr_scheduler
    if kind == "onecycle":
        pct = min(max(warm / max(total_steps, 1), 0.01), 0.99)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps + 1,
            pct_start=pct, div_factor=cfg.div_factor, anneal_strategy="cos",
            cycle_momentum=False)
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def every(step: int, interval: int) -> bool:
    """True every ``interval`` steps; an interval of 0 (or less) means off."""
    return interval > 0 and step % interval == 0


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and returns. A second
    signal falls back to the default behaviour (an immediate stop)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
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


def param_counts(model) -> dict:
    """All parameters and the trainable ones (what each run reports)."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def param_checksum(model, state_dict: Optional[dict] = None) -> str:
    """A hash of every parameter's bytes (of ``state_dict`` when given): equal iff the weights are bitwise equal."""
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted((model.state_dict() if state_dict is None else state_dict).items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reset_accelerate(world: int) -> None:
    """Let one process run several stages (pipeline: pretrain then SFT) with fresh accelerate settings."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def retie(state_dict: dict, model: nn.Module) -> dict:
    """Names of one shared parameter (T5's embedding, encoder and decoder inputs, LM head) point to one tensor
    again: gathering copies each name, and a saved folder drops only the aliases that share storage."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name and owner in state_dict and name in state_dict:
            state_dict[name] = state_dict[owner]
    return state_dict


def shard_on_cpu(acc) -> None:
    """Honour an FSDP launch on CPU processes: accelerate sets FSDP only for GPU-like devices and turns several CPU
    processes into DDP over gloo (``MULTI_CPU``), silently ignoring ``configs/accelerate_fsdp.yaml``. torch's FSDP2
    runs over gloo, so the launcher's FSDP settings (its environment) are applied here, in both shared states
    (every new ``AcceleratorState`` copies the process state's type over its own)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.environment import parse_flag_from_env
    if acc.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs an objective on accelerate: one process, DDP, or FSDP2 (configs/accelerate_fsdp.yaml; the DeepSpeed
    config there is untested)."""

    def __init__(self, cfg, objective: Objective):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.cfg, self.obj = cfg, objective
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.out = Path(cfg.output_dir)
        self.acc = Accelerator(cpu=cfg.cpu, mixed_precision=resolve_precision(cfg.mixed_precision, cfg.cpu),
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               log_with=None if cfg.log_with in (None, "", "none") else cfg.log_with,
                               project_dir=str(self.out))
        shard_on_cpu(self.acc)
        self.is_main, self.rank, self.world = self.acc.is_main_process, self.acc.process_index, self.acc.num_processes
        objective.setup(self)
        optimizer = build_optimizer(cfg, objective.model)
        self.scheduler = build_scheduler(cfg, optimizer, objective.total_steps)
        if self.acc.distributed_type == DistributedType.DEEPSPEED:  # no dataloader is prepared: say the batch
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size_per_gpu
            if ds.get("gradient_clipping") == "auto":
                ds["gradient_clipping"] = cfg.max_grad_norm
        self.module, self.optimizer = self.acc.prepare(objective.module(), optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.state = {"step": 0, "best_eval": None, "best_step": None, "samples": 0, "totals": {}}
        self.sums: dict[str, float] = {}
        self.last: dict = {}
        self.last_eval: dict = {}

    @property
    def sharded(self) -> bool:
        from accelerate.utils import DistributedType
        return self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def inner_model(self) -> nn.Module:
        """The trainable model inside the accelerate/DDP wrappers and the objective's module."""
        return self.acc.unwrap_model(self.module).model

    def eval_chunks(self, mine, everything, size: int) -> list[tuple]:
        """This rank's share ``mine`` of ``everything`` in chunks of ``size``, each with True (counted). A sharded
        model gathers weights in every forward, so ranks must run as many as the largest share needs: the short
        ones add chunks of ``everything[:1]`` with False (run, not counted)."""
        chunks = [(mine[i:i + size], True) for i in range(0, len(mine), size)]
        if not self.sharded:
            return chunks
        most = math.ceil(math.ceil(len(everything) / self.world) / size)
        return chunks + [(everything[:1], False)] * (most - len(chunks))

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        return save_run_state(self.acc, self.out, self.state["step"],
                              dict(self.state, total_steps=self.obj.total_steps, config=asdict(self.cfg)),
                              self.obj.batches.state_dict(), self.cfg.keep_last_n, (self.state["best_step"],))

    def resume(self) -> Optional[Path]:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.acc.print(f"--is_keep_training: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return None
        state, data_state = load_run_state(self.acc, ckpt)
        self.obj.batches.load_state_dict(data_state)
        self.state.update({k: state[k] for k in self.state if k in state})
        return ckpt

    def full_state_dict(self) -> Optional[dict]:
        """Sharded runs: the inner model's full weights, gathered once onto the main rank's CPU (every rank takes
        part; the others get an empty dict). Unsharded runs: None (the model holds its full weights)."""
        if not self.sharded:
            return None
        prefix = "model."  # the objective's module wraps the model as ``.model``
        gathered = {k[len(prefix):]: v for k, v in self.acc.get_state_dict(self.module).items()}
        return retie(gathered, self.inner_model()) if gathered else gathered

    def export(self, dest: Path, state_dict: Optional[dict] = None) -> Path:
        """The model as a plain HF folder (or a peft adapter) in ``dest``, written by the main rank; every rank
        takes part in gathering a sharded model unless its ``state_dict`` is passed."""
        state_dict = self.full_state_dict() if state_dict is None else state_dict
        if self.is_main:
            publish_model(self.inner_model(), self.obj.tokenizer, dest, state_dict)  # the model (or adapter)
        self.acc.wait_for_everyone()
        return dest

    # ------------------------------------------------------------------------------------------- loop
    def train_step(self) -> list:
        """One optimizer update over ``gradient_accumulation_steps`` micro-batches, the loss weighted by the
        objective's count (tokens, pairs) over the whole window."""
        cfg, acc, ga = self.cfg, self.acc, max(1, self.cfg.gradient_accumulation_steps)
        micro = [self.obj.batches.next_batch() for _ in range(ga)]
        window = sum(self.obj.count(b) for b in micro)
        for b in micro:
            with acc.accumulate(self.module):
                loss_sum, stats = self.obj.loss(self.module, b, acc.device)
                acc.backward(loss_sum * (ga / max(window, 1)))  # accelerate divides by ga once
                if acc.sync_gradients and cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    self.sums["grad_norm"] = float(acc.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.state["samples"] += len(b.keys)
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.state["step"] += 1
        self.epoch = micro[-1].epoch
        return micro

    def maybe_log(self, logger, force: bool = False) -> None:
        step = self.state["step"]
        if not (force or every(step, self.cfg.logging_steps)):
            return
        grad_norm = self.sums.pop("grad_norm", None)
        keys = sorted(self.sums)
        totals = self.acc.reduce(torch.tensor([self.sums[k] for k in keys], dtype=torch.float64,
                                              device=self.acc.device), "sum").tolist()
        window = dict(zip(keys, totals))
        for k, v in window.items():
            self.state["totals"][k] = self.state["totals"].get(k, 0.0) + v
        figures = self.obj.summarise(window, time.perf_counter() - self.window_t)
        self.last = dict(figures, lr=self.scheduler.get_last_lr()[0], epoch=self.epoch)
        if grad_norm is not None:
            self.last["grad_norm"] = grad_norm
        logger.log(step=step, split="train", **self.last)
        if self.acc.log_with:
            self.acc.log({"train/" + k: v for k, v in self.last.items()}, step=step)
        self.bar.update(self.task, info=" ".join(f"{k} {v:.4g}" for k, v in figures.items()
                                                 if k in ("loss", "rewards/accuracies", "tokens_per_s")))
        self.sums, self.window_t = {}, time.perf_counter()

    def maybe_eval(self, logger, force: bool = False) -> dict:
        step = self.state["step"]
        if not (force or every(step, self.cfg.eval_steps)):
            return {}
        ev = self.obj.evaluate(self)
        if not ev:
            return {}
        self.last_eval = ev
        logger.log(step=step, split="eval", **ev)
        if self.acc.log_with:
            self.acc.log({k if k.startswith("eval/") else "eval/" + k: v for k, v in ev.items()}, step=step)
        self.acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()
                                                    if isinstance(v, (int, float))))
        metric = self.obj.best_metric
        if metric and step > 0:
            best = self.state["best_eval"]
            if best is None or ev[metric] < best:
                self.state["best_eval"], self.state["best_step"] = ev[metric], step
                if self.cfg.save_best:
                    self.export(self.out / "best")
        return ev

    def maybe_save(self, stop: StopFlag) -> Optional[str]:
        """Checkpoint every ``save_steps``, or now when a signal arrived on any rank (then: stop)."""
        step, acc = self.state["step"], self.acc
        flag = torch.tensor([1.0 if stop.signum else 0.0], device=acc.device)
        if self.world > 1:
            flag = acc.reduce(flag, "sum")
        stopping = flag.item() > 0 and step < self.obj.total_steps
        if every(step, self.cfg.save_steps) or stopping:
            path = self.save_checkpoint()
            if stopping:
                by = signal.Signals(stop.signum).name if stop.signum else "peer"
                acc.print(f"{by}: saved {path}; continue with --is_keep_training=True")
                return by
        return None

    def fit(self) -> dict:
        cfg, acc, total = self.cfg, self.acc, self.obj.total_steps
        resumed = self.resume() if cfg.is_keep_training else None
        start = self.state["step"]
        logger = MetricsLogger(self.out / "metrics.jsonl", resume_step=start if resumed else None,
                               overwrite=not resumed, enabled=self.is_main)
        if acc.log_with and not acc.trackers:
            acc.init_trackers("tb", config={k: v for k, v in asdict(cfg).items()
                                             if isinstance(v, (int, float, str, bool))})
        self.obj.started(self, logger)
        acc.print(f"{self.obj.name}: training {self.obj.param_info['trainable_params']:,} of "
                  f"{self.obj.param_info['params']:,} parameters, {self.world} process(es), {total} steps"
                  + (f", resumed from {resumed}" if resumed else ""))
        result: dict[str, Any] = {}
        if self.obj.eval_at_start and not resumed:
            result["eval_before"] = self.maybe_eval(logger, force=True)
        self.module.train()
        t0, c0 = time.perf_counter(), time.process_time()
        self.window_t, self.epoch, stopped_by = time.perf_counter(), 0, None
        self.bar = progress_bar(info=True, disable=not (self.is_main and cfg.show_progress))
        with StopFlag() as stop, self.bar:
            self.task = self.bar.add_task(self.obj.name, total=total, completed=start, info="")
            while self.state["step"] < total:
                self.train_step()
                step = self.state["step"]
                self.maybe_log(logger, force=step in (start + 1, total))
                self.last.update(self.maybe_eval(logger, force=step == total))
                self.bar.update(self.task, completed=step)
                stopped_by = self.maybe_save(stop)
                if stopped_by:
                    break
        result.update({k: v for k, v in self.last.items()})
        result.update(output_dir=str(self.out), steps=self.state["step"], total_steps=total,
                      train_samples=self.state["samples"], interrupted=stopped_by is not None,
                      runtime_s=round(time.perf_counter() - t0, 2), cpu_s=round(time.process_time() - c0, 2),
                      best_step=self.state["best_step"], best_eval=self.state["best_eval"], **self.obj.param_info)
        state_dict = self.full_state_dict()
        if state_dict is None or self.is_main:  # before the export: saving consumes the dict
            result["param_checksum"] = param_checksum(self.inner_model(), state_dict)
        if stopped_by is None:
            self.export(self.out, state_dict)
        result = self.obj.finish(self, result)
        if acc.log_with:
            acc.end_training()
        return result


def run(cfg, objective: Objective) -> dict:
    """Train ``objective`` as ``cfg`` says; returns the stage's figures."""
    world = 1
    try:
        trainer = Trainer(cfg, objective)
        world = trainer.world
        return trainer.fit()
    finally:
        reset_accelerate(world)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
