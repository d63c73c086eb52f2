"""Fine-tune a model on triple extraction through the project trainer, then score it on the dev file.

Steps: (1) a tokenizer: the ``--init_from`` model's, ``--tokenizer_dir``, or one trained here on the training
texts (random init); (2) ``data_process.process``: DuIE/SKE files to prompt/response parquet (rows over the
token limits are dropped and counted); (3) ``model.training.trainer.train`` (every TrainConfig field is a flag);
(4) ``evaluate.evaluate`` on the dev file: micro P/R/F1, predictions in ``<output_dir>/ie_predictions.jsonl``.

    # from a pretrained/SFT model (the reference's setting)
    python finetune_examples/info_extract/finetune.py --init_from model_save/sft --output_dir model_save/ie
    # from random init, a `small` model, CPU
    python finetune_examples/info_extract/finetune.py --preset small --max_steps 1500 --num_threads 2
    # the demo: a few seconds on the 8 embedded examples (a fit to the training examples, not a test)
    python finetune_examples/info_extract/finetune.py demo
"""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Optional

from config import MODEL_PRESETS, SHARED_DATA, TRAIN_PRESETS, TrainConfig, config_help, run_cli
from finetune_examples.info_extract.data_process import format_triples, make_prompt, process, read_ie_file
from finetune_examples.info_extract.evaluate import evaluate, known_predicates, load_test_file
from model.tokenizer.build import save_tokenizer, train_tokenizer
from model.logging_utils import read_jsonl
from model.training.engine import run
from model.training.trainer import Seq2SeqObjective, probe_seconds_per_step, train_config

DUIE = SHARED_DATA / "ie" / "duie"

# Trainer settings for this task; any TrainConfig field given on the command line wins.
class ExtractionObjective(Seq2SeqObjective):
    """The seq2seq objective, and at every evaluation the dev F1 of greedy extraction on ``curve_file``'s first
    ``curve_limit`` sentences, so metrics.jsonl holds an F1-versus-updates curve (main process only: the
    generation needs no other rank)."""

    def __init__(self, cfg, curve_file: Optional[str], curve_limit: Optional[int], max_new_tokens: int,
                 constrained: bool = False):
        super().__init__(cfg)
        self.curve_file, self.curve_limit, self.max_new_tokens = curve_file, curve_limit, max_new_tokens
        self.constrained = constrained
        # the training file's predicates, read once rather than at every evaluation
        self.predicates = known_predicates(load_test_file(cfg.train_file)[1]) if constrained else None
        if not cfg.valid_file:
            self.best_metric = None  # no eval loss to pick a best model by; the F1 curve alone

    def evaluate(self, trainer) -> dict:
        metrics = super().evaluate(trainer)
        if self.curve_file and trainer.is_main and not trainer.sharded:
            t = time.perf_counter()
            model = trainer.inner_model()
            dev = evaluate("", self.curve_file, batch_size=self.cfg.eval_batch_size, limit=self.curve_limit,
                           max_new_tokens=self.max_new_tokens, max_source_len=self.cfg.max_source_len,
                           num_threads=self.cfg.num_threads or 2, model=model, tokenizer=self.tokenizer,
                           progress=False, constrained=self.constrained, predicates=self.predicates)
            model.train()
            metrics.update(dev_f1=dev["f1"], dev_precision=dev["precision"], dev_recall=dev["recall"],
                           dev_sentences=dev["sentences"], dev_eval_s=round(time.perf_counter() - t, 1))
        return metrics


def build_tokenizer(train_file: str | Path, out_dir: str | Path, vocab_size: int = 8192):
    """A char-BPE tokenizer on the training sentences and their responses (for a random-init model)."""
    texts = []
    for text, triples in read_ie_file(train_file):
        texts += [make_prompt(text), format_triples(triples)]
    tok = train_tokenizer(texts, vocab_size=vocab_size, token_type="char")
    save_tokenizer(tok, out_dir)
    return out_dir


def finetune(train_file: str = str(DUIE / "duie_train.json"), dev_file: Optional[str] = str(DUIE / "duie_dev.json"),
             init_from: Optional[str] = None, tokenizer_dir: Optional[str] = None, preset: str = "small",
             data_dir: str = "data/generated/ie", output_dir: str = "model_save/ie", valid_size: int = 200,
             eval_limit: Optional[int] = None, eval_batch_size: int = 32, max_new_tokens: int = 128,
             skip_eval: bool = False, time_budget_min: Optional[float] = None, probe_steps: int = 24,
             curve_points: int = 0, augment_copies: int = 0, sentence_order: bool = False,
             constrained: bool = False, progress: bool = True,
             **train_overrides) -> dict:
    """Process, train, evaluate; returns {'train': trainer figures, 'dev': P/R/F1, ...}.

    ``time_budget_min`` (without ``max_steps``) fits the run into a wall-clock budget: a ``probe_steps`` run
    measures seconds per step on this machine, then the real run gets as many steps as fit (the LR schedule
    must know its length in advance, so the run is sized rather than cut).

    ``curve_points`` > 0 evaluates dev F1 (on the ``eval_limit`` sentences) that many times during training, at
    even intervals: the F1-versus-updates curve lands in metrics.jsonl and ie_scores.json. Those evaluations
    are paid on top of the time budget.

    ``augment_copies`` adds entity-swapped copies of each training sentence (``augment.py``);
    ``sentence_order`` writes the training responses in sentence order (``data_process.in_sentence_order``);
    ``constrained`` decodes every dev evaluation under ``TripleConstraint`` (spans from the sentence, predicates
    from training).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(output_dir)
    if init_from:
        tok_dir = init_from
    elif tokenizer_dir:
        tok_dir = tokenizer_dir
    else:
        tok_dir = str(out.parent / f"{out.name}_tokenizer")
        vocab = MODEL_PRESETS.get(preset, {}).get("vocab_size", 8192)
        build_tokenizer(train_file, tok_dir, vocab)
    settings = {**TRAIN_PRESETS["ie"], **train_overrides}
    if init_from and "learning_rate" not in train_overrides:
        settings["learning_rate"] = 1e-4  # a pretrained model needs a gentler step than a fresh one
    paths = process(train_file, dev_file, data_dir, tokenizer_dir=tok_dir,
                    max_source_len=settings["max_source_len"], max_target_len=settings["max_target_len"],
                    valid_size=valid_size, augment_copies=augment_copies, sentence_order=sentence_order)
    common = dict(train_file=paths["train"], init_from=init_from, is_finetune=bool(init_from),
                  tokenizer_dir=tok_dir, preset=preset, show_progress=progress)
    result: dict = {"data": paths}
    if time_budget_min and settings.get("max_steps", -1) <= 0:
        t_probe = time.perf_counter()
        per_step = probe_seconds_per_step(train_config(None, **{**common, **settings, "output_dir": str(out)}),
                                          steps=probe_steps)
        # what the real run pays besides its steps (loading, data, export), as the probe paid it
        overhead = max(0.0, (time.perf_counter() - t_probe) - probe_steps * per_step)
        left_s = time_budget_min * 60 - (time.perf_counter() - t0) - overhead
        settings["max_steps"] = max(1, int(left_s / per_step))
        result["time_budget"] = {"minutes": time_budget_min, "probe_s_per_step": round(per_step, 4),
                                 "overhead_s": round(overhead, 1), "max_steps": settings["max_steps"]}
        print(f"time budget {time_budget_min} min: {per_step:.3f} s/step measured, "
              f"training {settings['max_steps']} steps")
    curve_file = paths.get("dev") if curve_points > 0 and dev_file and not skip_eval else None
    if curve_file and settings.get("max_steps", -1) > 0:
        settings["eval_steps"] = max(1, settings["max_steps"] // curve_points)
    cfg = train_config(None, valid_file=paths.get("valid"), output_dir=str(out), **common, **settings)
    result["train"] = run(cfg, ExtractionObjective(cfg, curve_file, eval_limit, max_new_tokens, constrained))
    if curve_file:
        result["f1_curve"] = [[r["step"], r["dev_f1"]] for r in read_jsonl(out / "metrics.jsonl") if "dev_f1" in r]
    result["train_minutes"] = round((time.perf_counter() - t0) / 60, 2)  # wall clock, data and probe included
    result["train_cpu_minutes"] = round((time.process_time() - cpu0) / 60, 2)
    if dev_file and not skip_eval and "dev" in paths:
        t1 = time.perf_counter()
        result["dev"] = evaluate(str(out), paths["dev"], batch_size=eval_batch_size, max_new_tokens=max_new_tokens,
                                 max_source_len=settings["max_source_len"], limit=eval_limit,
                                 num_threads=settings.get("num_threads") or 2, progress=progress,
                                 constrained=constrained, predicates_from=paths["train"])
        result["eval_minutes"] = round((time.perf_counter() - t1) / 60, 2)
        (out / "ie_scores.json").write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str),
                                            encoding="utf-8")
    return result


def demo(model_dir: Optional[str] = None, ie_file: str = "data/demo/ie_duie.json",
         output_dir: str = "model_save/demo/ie", max_steps: int = 150, num_threads: int = 1,
         progress: bool = True) -> dict:
    """The demo stage: fine-tune the demo model on the 8 embedded examples and extract them again.

    Eight examples teach the format, not the task: the score shows the model fits what it saw. One thread:
    on 2 shared cores two threads ran this 20x slower under contention (3 s vs 65 s for 20 steps).
    """
    if model_dir is None:  # the demo's final model, else its SFT stage
        model_dir = next((d for d in ("model_save/demo", "model_save/demo/dpo", "model_save/demo/sft")
                          if Path(d, "config.json").is_file()),
                         "model_save/demo")
    return finetune(train_file=ie_file, dev_file=ie_file, init_from=model_dir, data_dir=f"{output_dir}_data",
                    output_dir=output_dir, valid_size=0, max_steps=max_steps, batch_size_per_gpu=8,
                    learning_rate=3e-3, lr_scheduler="constant", warmup_steps=0, max_source_len=96,
                    max_target_len=96, max_new_tokens=96, num_threads=num_threads, progress=progress)


def _print(result: dict) -> None:
    dev = result.get("dev")
    if dev:
        print(f"dev: P {dev['precision']:.4f}  R {dev['recall']:.4f}  F1 {dev['f1']:.4f}  "
              f"({dev['sentences']} sentences, {dev['n_gold']} gold / {dev['n_pred']} predicted triples)")
    print(json.dumps({k: v for k, v in result.items()}, ensure_ascii=False, default=str))


def main(**kw):
    """Fine-tune and score (``demo`` as the first word: the few-second demo on the embedded examples)."""
    if kw.get("help") or kw.get("h"):
        opts = [f"  --{n:<26s} default {p.default!r}" for n, p in inspect.signature(finetune).parameters.items()
                if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]
        print("finetune.py options:\n" + "\n".join(opts) + "\n\nand every TrainConfig field (defaults: "
              f"TRAIN_PRESETS['ie'] in config.py):\n{config_help(TrainConfig)}")
        return
    _print(finetune(**kw))


def main_demo(**kw):
    """The demo: a few seconds on the 8 embedded examples (a fit to the training examples, not a test)."""
    _print(demo(**kw))


if __name__ == "__main__":
    run_cli(main, demo=main_demo)
