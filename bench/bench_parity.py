"""Learning parity: the project's loop against transformers' Seq2SeqTrainer, same run, held-out loss per update.

A quiet fault in masking, packing or accumulation would slow learning and show nowhere else (throughput benches
do not see it). So one initial model (saved once, loaded by every run), one optimiser (AdamW, the project's
parameter groups), one LR schedule, one batch size, and the exact batches of the project's data plan are trained
through

* ``ours``: ``model.training.trainer.train`` (train.py), unpacked;
* ``hf``: ``Seq2SeqTrainer`` fed the same batches in the same order (one dataset item = one planned batch);
* ``hf_reordered``: the same, each batch's rows in reverse order: identical mathematics, another float
  summation order. Its distance to ``hf`` is the band that rounding alone opens; ``ours`` must stay within
  three times it (plus 1e-4 for the last digits of the loss itself);
* ``ours_packed``: train.py with ``--packing``: several examples per row, so about twice the examples per update
  and another data order. It is a different run, not the same one summed differently, so it is reported, not
  judged: its distance at equal training target tokens to ``ours``, beside the spread another data order alone
  opens (``ours_seed2``). That a packed batch's loss equals its examples' losses unpacked is checked exactly in
  tests/test_packing.py.

Held-out loss: summed target-token cross-entropy over the valid split's targets / their token count, for every
run by the same function at the same updates. Seq2SeqTrainer's own ``eval_loss`` averages per-batch means
(weighted by rows, not tokens), so it is not used; its training loss is the batch's token mean, which with no
accumulation equals ours.

    python bench/bench_parity.py            # the `cpu` profile's model and data, 300 updates, held-out loss every 50
    python bench/bench_parity.py --quick    # 100 updates, every 25

Last line: {"bench": "parity", "ratio": hf final held-out loss / ours, "within_band": ours vs hf within the
rounding band, ...}.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import fire
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def heldout_loss(model, pairs: list, batch_size: int = 32) -> float:
    """Summed target-token cross-entropy / target tokens over ``pairs`` (the project's held-out figure)."""
    from model.data.dataset import collate_pairs
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = collate_pairs([pairs[j] for j in order[i: i + batch_size]])
        loss_sum, n = model.target_loss(**batch)
        total, count = total + float(loss_sum.double()), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def planned_batches(cfg, tokenizer, steps: int) -> list[list[tuple]]:
    """The (source, target) pairs of the first ``steps`` batches the project's loop draws for ``cfg`` (packed:
    the pairs of all the batch's rows)."""
    from model.data.dataset import make_batches
    mb = make_batches(cfg, tokenizer)
    out, epoch, i = [], 0, 0
    while len(out) < steps:
        plan = mb.plan(epoch)
        if i >= len(plan):
            epoch, i = epoch + 1, 0
            continue
        keys = [k for row in plan[i] for k in row] if cfg.packing else plan[i]
        out.append([mb.ds.pair(k, epoch) for k in keys])
        i += 1
    return out


def tokens_seen(batches: list) -> dict:
    """Training target tokens behind each update (0 before the first)."""
    return dict(enumerate(np.cumsum([0] + [sum(len(t) for _, t in b) for b in batches]).tolist()))


def hf_curve(cfg, init_dir: Path, batches: list, valid: list, every: int, out_dir: Path, collate=None) -> dict:
    """Seq2SeqTrainer over ``batches`` in order (one item = one batch), held-out loss every ``every`` updates;
    ``collate`` (default: the project's) turns one batch's pairs into tensors."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from model.chat_model import TextToTextModel
    from model.data.dataset import collate_pairs
    from model.training.engine import build_optimizer, build_scheduler
    model = TextToTextModel.from_pretrained(str(init_dir), dtype=torch.float32)
    curve = {0: heldout_loss(model, valid)}

    class Every(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0:
                curve[state.global_step] = heldout_loss(model, valid)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    opt = build_optimizer(cfg, model)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=1, max_steps=len(batches), learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, logging_steps=every,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=Batches(),
                             data_collator=lambda items: (collate or collate_pairs)(items[0]),
                             optimizers=(opt, build_scheduler(cfg, opt, len(batches))), callbacks=[Every()])
    t = time.perf_counter()
    trainer.train()
    return {"curve": curve, "seconds": round(time.perf_counter() - t, 1)}


def ours_curve(cfg, tokenizer, valid: list, init_value: float, tokens: dict | None = None) -> dict:
    """train.py's loop; its held-out loss per evaluation (the same figure: summed loss / target tokens)."""
    from model.logging_utils import read_jsonl
    from model.training.trainer import train
    t = time.perf_counter()
    r = train(cfg)
    rows = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    curve = {0: init_value}
    curve.update({x["step"]: x["eval_loss"] for x in rows if "eval_loss" in x})
    if tokens is None:
        tokens = tokens_seen(planned_batches(cfg, tokenizer, cfg.max_steps))
    return {"curve": curve, "tokens": tokens,
            "seconds": round(time.perf_counter() - t, 1), "steps": r["steps"]}


def compare(runs: dict) -> dict:
    """Distances between the curves and the bands they are judged against (see the module docstring)."""
    steps = sorted(set(runs["ours"]["curve"]) & set(runs["hf"]["curve"]) & set(runs["hf_reordered"]["curve"]))
    d_hf = max(abs(runs["ours"]["curve"][s] - runs["hf"]["curve"][s]) for s in steps)
    float_band = max(abs(runs["hf_reordered"]["curve"][s] - runs["hf"]["curve"][s]) for s in steps)
    out = {"steps_compared": steps, "ours_vs_hf": d_hf, "float_band": float_band,
           "hf_within_band": d_hf <= 3 * float_band + 1e-4}
    if "ours_packed" in runs and "ours_seed2" in runs:
        data_band = max(abs(runs["ours"]["curve"][s] - runs["ours_seed2"]["curve"][s]) for s in steps if s)
        tok_steps = sorted(runs["ours"]["tokens"])
        xs = np.array([runs["ours"]["tokens"][s] for s in tok_steps], dtype=float)
        ys_steps = np.array(tok_steps, dtype=float)
        diffs = []
        for s, v in runs["ours_packed"]["curve"].items():
            tok = runs["ours_packed"]["tokens"].get(s)
            if not s or tok is None or tok > xs[-1]:
                continue
            at = float(np.interp(tok, xs, ys_steps))  # the unpacked update with as many target tokens behind it
            ev = sorted(runs["ours"]["curve"])
            diffs.append(abs(v - float(np.interp(at, ev, [runs["ours"]["curve"][e] for e in ev]))))
        out.update(data_band=data_band, packed_vs_unpacked=max(diffs) if diffs else None,
                   packed_points=len(diffs))
    return out


def run_parity(train_file: str, valid_file: str, tokenizer_dir: Path, out: Path, steps: int, every: int,
               model_overrides: dict, preset: str = "small", batch_size: int = 16, max_len: int = 128,
               lr: float = 3e-3, valid_samples: int = 256, threads: int = 2, packed: bool = True) -> dict:
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    from model.data.dataset import TextToTextDataset
    from model.tokenizer.build import load_tokenizer
    from model.training.trainer import train_config
    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    init = save_model_folder(TextToTextModel.from_preset(preset, vocab_size=len(tokenizer), dropout_rate=0.0,
                                                         **model_overrides), tokenizer, out / "init")
    common = dict(init_from=str(init), train_file=train_file, valid_file=valid_file, max_steps=steps,
                  batch_size_per_gpu=batch_size,
                  learning_rate=lr, warmup_steps=0.02, lr_scheduler="cosine", max_source_len=max_len,
                  max_target_len=max_len, eval_steps=every, logging_steps=1, save_steps=0, save_best=False,
                  max_eval_samples=valid_samples, bleu_samples=0, baselines=False, num_threads=threads,
                  log_with="none", show_progress=False, seed=11, dropout_rate=0.0)
    cfg = train_config("pretrain", output_dir=str(out / "ours"), **common)
    valid_ds = TextToTextDataset(cfg.valid_file, tokenizer, max_len, max_len, seed=cfg.seed, max_samples=valid_samples)
    valid = [valid_ds.pair(k) for k in valid_ds.sample_keys]
    init_value = heldout_loss(TextToTextModel.from_pretrained(str(init), dtype=torch.float32), valid)
    batches = planned_batches(cfg, tokenizer, steps)
    runs = {"ours": ours_curve(cfg, tokenizer, valid, init_value, tokens_seen(batches))}
    runs["hf"] = hf_curve(cfg, init, batches, valid, every, out / "hf")
    runs["hf_reordered"] = hf_curve(cfg, init, [b[::-1] for b in batches], valid, every, out / "hf_reordered")
    if packed:
        runs["ours_packed"] = ours_curve(train_config("pretrain", output_dir=str(out / "packed"), packing=True,
                                                      **common), tokenizer, valid, init_value)
        runs["ours_seed2"] = ours_curve(train_config("pretrain", output_dir=str(out / "seed2"),
                                                     **dict(common, seed=12)), tokenizer, valid, init_value, {})
    return {"runs": runs, "valid": valid, **compare(runs)}


def main(quick: bool = False, steps: int = 0, every: int = 0, data: str = "", tokenizer_dir: str = "",
         out: str = "model_save/bench_parity", threads: int = 2, packed: bool = True) -> None:
    from bench.bench_recipe import _prepare
    from config import CPU_MODEL
    steps = steps or (100 if quick else 300)
    every = every or (25 if quick else 50)
    out_p = ROOT / out if not Path(out).is_absolute() else Path(out)
    if data and tokenizer_dir:
        data_p, tok = Path(data), Path(tokenizer_dir)
    else:  # the `cpu` profile's data stage and 8,192-id tokenizer, built once under bench_recipe's folder
        data_p, toks = _prepare(ROOT / "model_save" / "bench_recipe", ("8192",))
        tok = toks["8192"]
    res = run_parity(f"{data_p / 'my_text_dataset.parquet'}:1,{data_p / 'my_train_dataset.parquet'}:1",
                     str(data_p / "my_valid_dataset.parquet"), tok, out_p, steps, every, CPU_MODEL, threads=threads,
                     packed=packed)
    runs = res.pop("runs")
    res.pop("valid")
    print(f"held-out loss (nats/token) by update, {steps} updates, {threads} threads")
    names = list(runs)
    print("update " + " ".join(f"{n:>13s}" for n in names))
    for s in sorted(runs["ours"]["curve"]):
        print(f"{s:>6d} " + " ".join(f"{runs[n]['curve'].get(s, float('nan')):>13.5f}" for n in names))
    final = max(runs["ours"]["curve"])
    summary = {"bench": "parity", "ratio": round(runs["hf"]["curve"][final] / runs["ours"]["curve"][final], 6),
               "within_band": bool(res["hf_within_band"]),
               "final_loss": {n: round(r["curve"][max(r["curve"])], 5) for n, r in runs.items()},
               "seconds": {n: r["seconds"] for n, r in runs.items()}, "steps": steps, "every": every,
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items() if k != "steps_compared"}}
    (out_p / "parity.json").write_text(json.dumps({"summary": summary, "curves": {
        n: {str(k): v for k, v in r["curve"].items()} for n, r in runs.items()}}, indent=1), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire(main)
