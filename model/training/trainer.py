"""Pretraining, SFT and the IE fine-tune: the sequence-to-sequence objective of the one training loop
(:mod:`model.training.engine`), and the same stages through transformers' ``Seq2SeqTrainer`` for comparison.

Entry point: ``train(cfg: TrainConfig) -> dict``. The loss is the summed target-token cross-entropy from
``TextToTextModel.target_loss``, weighted by target tokens over the whole accumulation window; evaluation
reports loss, perplexity, bits per character against character baselines, and char BLEU on a sample.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from config import TRAIN_PRESETS, TrainConfig, make_config
from model.data.checkpoint import check_model_folder, publish_model
from model.training.engine import (Objective, build_optimizer, build_scheduler, param_checksum,
                                   param_counts, planned_steps, reset_accelerate, run, write_json)



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
    from model.tokenizer.build import load_tokenizer

    if cfg.is_finetune and not cfg.init_from:
        raise ValueError("--is_finetune=True needs --init_from=<pretrained model folder> (e.g. model_save/pretrain)")
    if cfg.init_from:
        folder = check_model_folder(cfg.init_from)
        tokenizer = load_tokenizer(folder)
        config = TextToTextModel.config_class.from_pretrained(str(folder))
        if cfg.dropout_rate is not None:  # set on the config: a loading kwarg also lands in generation_config.json
            config.dropout_rate = cfg.dropout_rate
        model = TextToTextModel.from_pretrained(str(folder), config=config, dtype=torch.float32)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer_dir)
        extra = {} if cfg.dropout_rate is None else {"dropout_rate": cfg.dropout_rate}
        model = TextToTextModel.from_preset(cfg.preset, vocab_size=len(tokenizer), **{**cfg.model_overrides, **extra})
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"model has {model.config.vocab_size} embeddings but the tokenizer {len(tokenizer)} ids")
    return tokenizer, model


def apply_freeze(model, mode: str) -> dict:
    """``decoder_only`` (the reference SFT): shared embeddings (tied to the LM head) and encoder frozen."""
    if mode == "decoder_only":
        for p in model.shared.parameters():
            p.requires_grad_(False)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return param_counts(model)


class TargetLoss(nn.Module):
    """The module DDP/FSDP wraps: one forward runs ``TextToTextModel.target_loss``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model.target_loss(**batch)


class Seq2SeqObjective(Objective):
    """Prompt -> response pairs (or text turned into pairs): summed target-token loss, weighted by tokens."""

    name = "train"
    best_metric = "eval_loss"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def setup(self, trainer) -> None:
        from accelerate.utils import set_seed

        from model.data.dataset import TextToTextDataset, make_batches, open_sources
        from model.data.sources import bad_row_report
        cfg, acc = self.cfg, trainer.acc
        open_sources(cfg.train_file)  # a bad file fails here, before any model is built
        set_seed(cfg.seed)
        self.tokenizer, self.model = load_tokenizer_and_model(cfg)
        self.param_info = apply_freeze(self.model, cfg.freeze)
        set_seed(cfg.seed + trainer.rank)  # dropout differs between ranks; weights are broadcast by DDP anyway
        self.batches = make_batches(cfg, self.tokenizer, trainer.rank, trainer.world,
                                    show_progress=trainer.is_main and cfg.show_progress)
        skipped = getattr(getattr(self.batches, "ds", None), "skipped", {})
        if sum(skipped.values()):
            acc.print("skipped empty rows: " + ", ".join(f"{p}: {n}" for p, n in skipped.items() if n))
        for line in bad_row_report(getattr(getattr(self.batches, "ds", self.batches), "sources", [])):
            acc.print(line)  # rows that did not fit their schema: file, row, field, what was expected
        self.valid, self.valid_chars, self.baselines, self.copy_rows = None, 0, {}, []
        if cfg.valid_file:
            self.valid = TextToTextDataset(cfg.valid_file, self.tokenizer,
                                           cfg.eval_max_source_len or cfg.max_source_len,
                                           cfg.eval_max_target_len or cfg.max_target_len, cfg.text_mode,
                                           cfg.noise_density, cfg.mean_noise_span_length, seed=cfg.seed,
                                           max_samples=cfg.max_eval_samples, copy_max_len=cfg.copy_max_len)
            first = self.valid.sample_keys[: cfg.copy_eval_samples]
            self.copy_rows = copy_rows([self.valid.pair(k)[1] for k in first], cfg.copy_eval_samples, cfg.copy_max_len)
            targets = self.valid_target_texts()
            self.valid_chars = sum(len(t) for t in targets)
            if cfg.baselines and trainer.is_main:
                self.baselines = char_baselines(cfg.train_file, targets, trainer.out)
        self.total_steps = planned_steps(cfg, self.batches.batches_per_epoch)

    def module(self):
        return TargetLoss(self.model)

    def started(self, trainer, logger) -> None:
        if self.baselines:
            logger.log(step=trainer.state["step"], **self.baselines)
            trainer.acc.print("held-out character baselines: unigram {baseline_unigram_bpc:.3f} bpc, bigram "
                              "{baseline_bigram_bpc:.3f} bpc".format(**self.baselines))

    def count(self, batch) -> int:
        return batch.num_tokens()[1]

    def loss(self, module, batch, device):
        tensors = {k: v.to(device, non_blocking=True) for k, v in batch.tensors.items()}
        loss_sum, _ = module(**tensors)
        n_in, n_tgt = batch.num_tokens()
        return loss_sum, {"loss_sum": float(loss_sum.detach()), "tgt_tokens": n_tgt, "in_tokens": n_in,
                          "padded": tensors["input_ids"].numel() + tensors["labels"].numel()}

    def summarise(self, sums: dict, seconds: float) -> dict:
        return {"loss": sums["loss_sum"] / max(sums["tgt_tokens"], 1),
                "tokens_per_s": (sums["tgt_tokens"] + sums["in_tokens"]) / max(seconds, 1e-9)}

    # --------------------------------------------------------------------------------------- evaluation
    def valid_target_texts(self) -> list[str]:
        """The text of every validation target (what bits per character divide by)."""
        ds = self.valid
        return self.tokenizer.batch_decode([ds.pair(k)[1] for k in ds.sample_keys], skip_special_tokens=True)

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        """Eval loss, perplexity and bpc over the validation set (token-weighted, all ranks), char BLEU on a
        sample."""
        from model.data.dataset import collate_pairs
        from model.training.metrics import perplexity
        from model.quality import bits_per_char
        if self.valid is None:
            return {}
        acc, cfg, ds = trainer.acc, self.cfg, self.valid
        trainer.module.eval()
        keys = ds.sample_keys[trainer.rank::trainer.world]
        if len(keys):
            keys = keys[np.argsort(-ds.key_lengths(keys).sum(axis=1), kind="stable")]
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        n_tok = torch.zeros((), dtype=torch.float64, device=acc.device)
        for chunk, counted in trainer.eval_chunks(keys, ds.sample_keys, cfg.eval_batch_size):
            batch = collate_pairs([ds.pair(k) for k in chunk])
            with acc.autocast():
                batch_loss, n = trainer.module(**{k: v.to(acc.device) for k, v in batch.items()})
            if counted:
                loss_sum += batch_loss.double()
                n_tok += n
        loss_sum, n_tok = acc.reduce(loss_sum, "sum"), acc.reduce(n_tok, "sum")
        loss = float(loss_sum / n_tok.clamp(min=1))
        metrics = {"eval_loss": loss, "eval_ppl": perplexity(loss),
                   "eval_bpc": bits_per_char(float(loss_sum), self.valid_chars)}
        if cfg.bleu_samples > 0 and not trainer.sharded:
            metrics.update(self.sample_bleu(trainer))
        if self.copy_rows and not trainer.sharded:
            metrics.update(self.copy_figures(trainer))
        trainer.module.train()
        return metrics

    def copy_figures(self, trainer) -> dict:
        """The held-out copy figures: mean loss (nats per target token) of writing each held-out target out again
        from itself, and the share that greedy decoding reproduces exactly. A model that has acquired copying
        goes towards 0 and 1; one that has not stays near its language-model loss and 0."""
        from accelerate.utils import gather_object

        from model.data.dataset import collate_pairs
        acc, cfg = trainer.acc, self.cfg
        rows = self.copy_rows[trainer.rank::trainer.world]
        model = trainer.inner_model()
        loss_sum, n_tok, hits = 0.0, 0, 0
        for i in range(0, len(rows), cfg.eval_batch_size):
            chunk = rows[i: i + cfg.eval_batch_size]
            batch = {k: v.to(acc.device) for k, v in collate_pairs([(r, r) for r in chunk]).items()}
            with acc.autocast():
                batch_loss, n = model.target_loss(**batch)
                gen = model.my_generate(batch["input_ids"], batch["attention_mask"],
                                        max_new_tokens=cfg.copy_max_len + 1, search_type="greedy")
            loss_sum, n_tok = loss_sum + float(batch_loss), n_tok + int(n)
            hits += sum(exact_copy(g, r) for g, r in zip(gen.tolist(), chunk))
        parts = gather_object([(loss_sum, n_tok, hits, len(rows))])
        total = sum(p[3] for p in parts)
        return {"eval_copy_loss": sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts)),
                "eval_copy_rate": sum(p[2] for p in parts) / max(1, total), "copy_samples": total}

    def sample_bleu(self, trainer) -> dict:
        """Char BLEU of greedy answers to the first ``bleu_samples`` validation prompts."""
        from accelerate.utils import gather_object

        from model.data.dataset import collate_pairs
        from model.training.metrics import char_bleu
        acc, cfg, ds = trainer.acc, self.cfg, self.valid
        pairs = [ds.pair(k) for k in ds.sample_keys[: cfg.bleu_samples][trainer.rank::trainer.world]]
        hyps, refs = [], []
        model = trainer.inner_model()
        for i in range(0, len(pairs), cfg.eval_batch_size):
            chunk = pairs[i: i + cfg.eval_batch_size]
            batch = collate_pairs(chunk)
            with acc.autocast():
                gen = model.my_generate(batch["input_ids"].to(acc.device), batch["attention_mask"].to(acc.device),
                                        max_new_tokens=cfg.max_target_len, search_type="greedy")
            hyps += self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            refs += self.tokenizer.batch_decode([t for _, t in chunk], skip_special_tokens=True)
        both = gather_object(list(zip(hyps, refs)))
        return {"bleu": char_bleu([h for h, _ in both], [r for _, r in both]), "bleu_samples": len(both)}

    # ------------------------------------------------------------------------------------------- output
    def finish(self, trainer, result: dict) -> dict:
        totals = trainer.state["totals"]
        tokens = totals.get("tgt_tokens", 0) + totals.get("in_tokens", 0)
        result.update(train_tokens=int(tokens), pad_share=round(1 - tokens / max(1.0, totals.get("padded", 0)), 4),
                      best_eval_loss=result.pop("best_eval"), **self.baselines)
        if not result["interrupted"] and trainer.is_main:
            write_json(trainer.out / "train_result.json", result)
            try:
                from model.training.plots import plot_curves
                plot_curves(trainer.out / "metrics.jsonl", trainer.out / "loss_curve.png",
                            keys=["loss", "eval_loss", "eval_bpc", "lr", "bleu", "eval_copy_rate"])
            except Exception as e:  # a plot must never fail a finished run
                trainer.acc.print(f"loss curve not drawn: {e}")
        result["skipped_rows"] = self.skipped_rows()
        return result

    def skipped_rows(self) -> int:
        """Empty rows left out (in memory: at load; streaming: so far on this rank)."""
        if hasattr(self.batches, "ds"):
            return sum(self.batches.ds.skipped.values())
        return self.batches.st.skipped


def copy_rows(targets: list, n: int, max_len: int) -> list:
    """The first ``n`` held-out targets, each cut to ``max_len`` tokens with its [EOS] last: copy-eval rows."""
    from config import EOS_ID
    out = []
    for t in targets[: max(0, n)]:
        ids = [int(x) for x in t if int(x) != EOS_ID][: max_len - 1]
        if ids:
            out.append(np.asarray(ids + [EOS_ID], dtype=np.int32))
    return out


def exact_copy(generated: list, row) -> bool:
    """Whether a generated sequence (decoder start, then tokens) writes ``row`` (ending in [EOS]) exactly."""
    from config import EOS_ID, PAD_ID
    ids = [t for t in generated if t != PAD_ID]
    want = [int(x) for x in row]
    return ids[: len(want)] == want or (ids == want[:-1] and want[-1] == EOS_ID)


def train(cfg: TrainConfig) -> dict:
    """Run one training stage; returns its figures (steps, loss, eval loss/perplexity/bpc/BLEU, tokens/s...)."""
    return run(cfg, Seq2SeqObjective(cfg))


def probe_seconds_per_step(cfg: TrainConfig, steps: int = 24, warmup: int = 3) -> float:
    """Steady-state seconds per update, measured by a short run of ``cfg`` (its folder is removed after).

    Sizes runs that must fit a wall-clock budget (the LR schedule needs its length in advance). The mean
    gap between logged steps after ``warmup`` leaves out loading and the slow first steps, which make the whole
    probe's runtime / steps about 2x the steady cost on a 2M model. The mean, not the median: length-grouped
    batches differ in cost, and the run pays for all of them.
    """
    import dataclasses
    import shutil
    from model.logging_utils import read_jsonl
    probe = dataclasses.replace(cfg, max_steps=max(steps, warmup + 2), logging_steps=1, save_steps=0, eval_steps=0,
                                valid_file=None, log_with="none", show_progress=False, bleu_samples=0,
                                output_dir=f"{cfg.output_dir.rstrip('/')}.probe")
    try:
        r = train(probe)
        times = [row["time"] for row in read_jsonl(Path(probe.output_dir) / "metrics.jsonl") if "loss" in row]
    finally:
        shutil.rmtree(probe.output_dir, ignore_errors=True)
    gaps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return sum(gaps) / len(gaps) if gaps else r["runtime_s"] / probe.max_steps


_FITTED_BASELINES: dict = {}  # training files' signature -> CharNgramBaselines (one fit per process)


def char_baselines(train_file: str, targets: list[str], out: Path) -> dict:
    """Character unigram/bigram bpc of the held-out targets, estimated on the run's training text.

    The fit is kept per process (a study runs many configs on one text) and the figures are cached in
    ``out/baselines.json`` under the training files' names, sizes and times and the targets, so a resumed run
    does not count again.
    """
    import hashlib
    from model.data.sources import iter_source_rows, open_sources, source_signature
    from model.quality import CharNgramBaselines
    sources = [s for s in open_sources(train_file) if s.weight > 0]
    signature = json.dumps([source_signature(s) for s in sources])
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



# ------------------------------------------------------------------------- transformers' Seq2SeqTrainer
def _hf_datasets(cfg: TrainConfig, tokenizer):
    """(training set, validation set or None) for the Seq2SeqTrainer path: the datasets ``train`` reads."""
    from model.data.dataset import StreamingTextToText, TextToTextDataset
    common = dict(max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len, text_mode=cfg.text_mode,
                  noise_density=cfg.noise_density, mean_noise_span_length=cfg.mean_noise_span_length,
                  copy_max_len=cfg.copy_max_len)
    if cfg.streaming:
        train_ds = StreamingTextToText(cfg.train_file, tokenizer, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                       group_by_length=False, **common)
    else:
        train_ds = TextToTextDataset(cfg.train_file, tokenizer, seed=cfg.seed, **common)
    valid_ds = TextToTextDataset(cfg.valid_file, tokenizer, seed=cfg.seed, max_samples=cfg.max_eval_samples,
                                 **common) if cfg.valid_file else None
    return train_ds, valid_ds


def _hf_arguments(cfg: TrainConfig, has_valid: bool, group: bool) -> dict:
    """``Seq2SeqTrainingArguments`` fields from the stage config (intervals of 0 mean off, as in ``train``)."""
    mp = cfg.mixed_precision
    use_gpu = torch.cuda.is_available() and not cfg.cpu
    if mp == "auto":
        mp = "bf16" if use_gpu and torch.cuda.is_bf16_supported() else "no"
    return dict(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size_per_gpu,
        per_device_eval_batch_size=cfg.eval_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        # an interval of 0 means off, as in the project's trainer
        logging_strategy="steps" if cfg.logging_steps > 0 else "no", logging_steps=max(1, cfg.logging_steps),
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(1, cfg.save_steps),
        save_total_limit=cfg.keep_last_n,
        eval_strategy="steps" if has_valid and cfg.eval_steps > 0 else "no",
        eval_steps=max(1, cfg.eval_steps),
        bf16=mp == "bf16", fp16=mp == "fp16", use_cpu=not use_gpu,
        report_to="none" if cfg.log_with in (None, "", "none") else cfg.log_with,
        train_sampling_strategy="group_by_length" if group else "random", remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers, disable_tqdm=not cfg.show_progress, save_safetensors=True,
        logging_dir=str(Path(cfg.output_dir) / "runs"),
    )


def hf_train(cfg: TrainConfig, reference_settings: bool = False, group_by_length: Optional[bool] = None,
             resume_from_checkpoint=None, callbacks=None, data_collator=None) -> dict:
    """The same stage through ``Seq2SeqTrainer``: same dataset, collator, model code and (unless
    ``reference_settings``) the same optimizer and LR schedule as :func:`train`.

    ``reference_settings=True`` reproduces the reference's HF scripts for comparison: Adafactor, linear
    schedule, random sampling (no length grouping) unless ``group_by_length`` says otherwise.
    """
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from model.data.dataset import Seq2SeqCollator

    if cfg.num_threads and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_tokenizer_and_model(cfg)
    info = apply_freeze(model, cfg.freeze)
    train_ds, valid_ds = _hf_datasets(cfg, tokenizer)
    group = cfg.group_by_length if group_by_length is None else group_by_length
    if cfg.max_steps <= 0 and cfg.streaming:
        raise ValueError("streaming through transformers' Trainer needs --max_steps (the stream has no length)")
    args = _hf_arguments(cfg, valid_ds is not None, group)
    optimizers = (None, None)
    if reference_settings:
        args.update(optim="adafactor", lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps)
    else:
        per_epoch = None if cfg.streaming else math.ceil(len(train_ds) / cfg.batch_size_per_gpu)
        total = planned_steps(cfg, per_epoch)
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
        publish_model(trainer.model, tokenizer, cfg.output_dir)
    result["param_checksum"] = param_checksum(trainer.model)
    if trainer.args.world_size <= 1:
        reset_accelerate(1)
    return result
