"""Copy probe: when does a small T5 learn to copy its input, by attention layout and learning rate?

Triple extraction writes entities that are spans of the sentence, so the decoder must find a token in the
encoder's output and continue from the one after it. T5 has no absolute positions (relative biases in
self-attention only, none in cross-attention), so the copy is found by content. Small models learn it in a
phase transition: the loss sits on a plateau, then drops by several nats within a few hundred updates. This
bench trains the `cpu` profile's shape (d_model 128, 2+2 layers) to copy, with a linear warm-up then a constant
learning rate, and reports per configuration:

* ``onset``: the first update at which the mean training loss of a ``every``-update window is below 1 nat
  (DESIGN.md "Model quality"; null when the run ends first);
* ``copy_rate``: the share of held-out sequences the final model reconstructs exactly (greedy decoding).

Two tasks: ``random`` (sequences of ``length`` ids drawn from ``alphabet``; chance loss ln(alphabet)) and
``natural`` (DuIE training sentences up to ``max_chars`` characters, one id per character over the training
text's most frequent characters; held out: DuIE dev sentences, never trained on). A run stops early once its
window loss is below ``stop_loss`` (the transition is behind it), so the full grid fits in the bench's budget.
Configurations run in parallel, one thread each.

    python bench/bench_copy.py            # 3 layouts x 3 learning rates x 2 tasks, up to 5,000 updates each
    python bench/bench_copy.py --quick    # 4x32 and 8x16 at lr 2e-3, up to 2,500 updates (a few minutes)
    python bench/bench_copy.py --tasks natural --layouts 8x16 --lrs 2e-3 --precisions no,bf16  # bf16 autocast

The last line is one JSON object: {"bench": "copy", "ratio": onset of 4x32 / onset of 8x16 (natural text,
lr 2e-3; a run that never crosses counts as its length, so the ratio is then a lower bound), "onset":
{config: update or null}, "copy_rate": {config: share}, ...}.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fire
import numpy as np
import torch

from config import CPU_MODEL, SHARED_DATA

LAYOUTS = {"4x32": dict(num_heads=4, d_kv=32), "8x16": dict(num_heads=8, d_kv=16), "16x8": dict(num_heads=16, d_kv=8)}
DUIE = SHARED_DATA / "ie" / "duie"
PAD, EOS, UNK, FIRST_ID = 0, 1, 6, 200  # ids clear of the project's special tokens and sentinels


def duie_sentences(path: Path, max_chars: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            if 2 <= len(text) <= max_chars:
                out.append(text)
    return out


def natural_task(max_chars: int, vocab: int, heldout: int) -> dict:
    """Training and held-out sentences as id arrays over the training text's ``vocab`` most frequent chars."""
    train = duie_sentences(DUIE / "duie_train.json", max_chars) + duie_sentences(DUIE / "duie_train_4000.json",
                                                                              max_chars)
    dev = duie_sentences(DUIE / "duie_dev.json", max_chars)[:heldout]
    chars = [c for c, _ in Counter("".join(train)).most_common(vocab)]
    ids = {c: FIRST_ID + i for i, c in enumerate(chars)}

    def encode(s):
        return np.array([ids.get(c, UNK) for c in s] + [EOS], dtype=np.int64)

    return {"train": [encode(s) for s in train], "heldout": [encode(s) for s in dev]}


def pad(rows: list[np.ndarray]) -> torch.Tensor:
    out = np.full((len(rows), max(len(r) for r in rows)), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def copy_rate(model, rows: list[np.ndarray], batch: int = 50) -> float:
    """Share of ``rows`` (each ending in [EOS]) that greedy decoding reproduces exactly."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i: i + batch]
            x = pad(chunk)
            gen = model.generate(input_ids=x, attention_mask=(x != PAD).long(), do_sample=False, num_beams=1,
                                 max_new_tokens=max(len(r) for r in chunk) + 2)
            for r, g in zip(chunk, gen.tolist()):
                g = g[1:]  # the decoder start token
                hits += g[: len(r)] == r.tolist()
    model.train()
    return hits / max(1, len(rows))


def run_config(spec: dict) -> dict:
    """Train one configuration; returns its curve, onset and held-out copy rate."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])
    rng = np.random.default_rng(spec["seed"] + 1)
    cfg = T5Config(vocab_size=8192 + FIRST_ID, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
                   eos_token_id=EOS, **dict(CPU_MODEL, **LAYOUTS[spec["layout"]]))
    model = T5ForConditionalGeneration(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    warm = spec["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    if spec["task"] == "random":
        def draw():
            x = rng.integers(FIRST_ID, FIRST_ID + spec["alphabet"], (spec["batch"], spec["length"]))
            return pad([np.append(r, EOS) for r in x])
        heldout = [np.append(r, EOS) for r in np.random.default_rng(10_000 + spec["seed"]).integers(
            FIRST_ID, FIRST_ID + spec["alphabet"], (spec["heldout"], spec["length"]))]
    else:
        data = natural_task(spec["max_chars"], 8000, spec["heldout"])
        train, heldout = data["train"], data["heldout"]

        def draw():
            return pad([train[i] for i in rng.integers(0, len(train), spec["batch"])])
    t0 = time.perf_counter()
    curve, acc, onset, step = [], 0.0, None, 0
    for step in range(1, spec["steps"] + 1):
        x = draw()
        labels = x.masked_fill(x == PAD, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
            loss = model(input_ids=x, attention_mask=(x != PAD).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        acc += loss.item()
        if step % spec["every"] == 0:
            mean = acc / spec["every"]
            curve.append((step, round(mean, 4)))
            acc = 0.0
            if onset is None and mean < 1.0:
                onset = step
            if mean < spec["stop_loss"]:
                break
    seconds = time.perf_counter() - t0
    return {"name": spec["name"], "onset": onset, "steps": step, "final_loss": curve[-1][1] if curve else None,
            "copy_rate": round(copy_rate(model, heldout), 4), "heldout": len(heldout), "curve": curve,
            "train_s": round(seconds, 1), "s_per_update": round(seconds / max(step, 1), 4)}


def _names(value) -> list[str]:
    """A comma list from the command line (fire turns ``2e-3`` into a float and ``a,b`` into a tuple)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def main(quick: bool = False, steps: int = 0, layouts: str = "", lrs: str = "", tasks: str = "random,natural",
         alphabet: int = 500, length: int = 20, max_chars: int = 64, batch: int = 16, warmup: int = 200,
         every: int = 50, stop_loss: float = 0.15, heldout: int = 200, seed: int = 0, workers: int = 2,
         precisions: str = "no",
         out: str = "bench/out/copy_curves.jsonl") -> None:
    steps = steps or (2500 if quick else 5000)
    layouts = layouts or ("4x32,8x16" if quick else "4x32,8x16,16x8")
    lrs = lrs or ("2e-3" if quick else "1e-3,2e-3,4e-3")
    specs = []
    for task in _names(tasks):
        for lay in _names(layouts):
            for lr in _names(lrs):
                for prec in _names(precisions):
                    if quick and task == "random" and lay != "8x16":
                        continue
                    name = f"{task}/{lay}/lr{float(lr):g}" + ("" if prec == "no" else f"/{prec}")
                    specs.append(dict(name=name, task=task, layout=lay, lr=float(lr), steps=steps, precision=prec,
                                      alphabet=alphabet, length=length, max_chars=max_chars, batch=batch,
                                      warmup=warmup, every=every, stop_loss=stop_loss, heldout=heldout, seed=seed))
    print(f"{len(specs)} configurations, up to {steps} updates each (batch {batch}, warm-up {warmup}, then "
          f"constant; stop once a {every}-update window is below {stop_loss} nats), {workers} at a time, 1 thread "
          f"each; chance on random ids ln({alphabet}) = {math.log(alphabet):.2f}", flush=True)
    results = {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool, open(out, "w", encoding="utf-8") as log:
        for r in pool.map(run_config, specs):
            results[r["name"]] = r
            log.write(json.dumps(r) + "\n")
            print(f"{r['name']:<24s} onset {str(r['onset']):>5s}  final loss {r['final_loss']:.3f} at update "
                  f"{r['steps']}  held-out copy rate {r['copy_rate']:.3f}  ({r['s_per_update']:.3f} s/update)",
                  flush=True)
    print("\nloss by update (window means)")
    for r in results.values():
        marks = {s: v for s, v in r["curve"]}
        shown = [s for s in (250, 500, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 4000, 5000) if s in marks]
        print(f"{r['name']:<24s} " + "  ".join(f"{s}:{marks[s]:.2f}" for s in shown))

    def onset_or_length(name):
        r = results.get(name)
        return None if r is None else (r["onset"] or r["steps"])

    base, ours = onset_or_length("natural/4x32/lr0.002"), onset_or_length("natural/8x16/lr0.002")
    summary = {"bench": "copy", "ratio": round(base / ours, 4) if base and ours else None,
               "ratio_is_lower_bound": bool(results.get("natural/4x32/lr0.002", {}).get("onset") is None),
               "onset": {n: r["onset"] for n, r in results.items()},
               "copy_rate": {n: r["copy_rate"] for n, r in results.items()},
               "final_loss": {n: r["final_loss"] for n, r in results.items()},
               "updates": {n: r["steps"] for n, r in results.items()},
               "s_per_update": {n: r["s_per_update"] for n, r in results.items()},
               "steps": steps, "warmup": warmup, "batch": batch, "alphabet": alphabet, "length": length,
               "max_chars": max_chars, "chance": round(math.log(alphabet), 4), "threads_per_config": 1}
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire(main)
