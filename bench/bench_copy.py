"""Copy probe: how fast does a small T5 learn to copy its input, by attention layout?

Triple extraction writes entities that appear in the sentence, so the decoder must learn to find a token in the
encoder's output and continue from the token after it. T5 has no absolute positions (relative biases in
self-attention only, none in cross-attention), so the copy has to be found by content. This bench trains the
`cpu` profile's shape (d_model 128, 2+2 layers) on copying random sequences of ``length`` tokens drawn from
``alphabet`` ids, with the same steps and learning rate for each head layout, and prints the training loss
curve. The loss of a model that cannot copy stays near ln(alphabet); a model that copies goes towards 0.

    python bench/bench_copy.py            # 4x32, 8x16, 16x8 heads x d_kv, 1,500 steps each (~5 min on 2 cores)
    python bench/bench_copy.py --quick    # 400 steps each

The last line is one JSON object: {"bench": "copy", "ratio": final loss of 4x32 / final loss of the best
layout, "loss": {layout: final loss}, "chance": ln(alphabet), ...}.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fire  # noqa: E402
import torch  # noqa: E402

from config import CPU_MODEL  # noqa: E402

LAYOUTS = {"4x32": dict(num_heads=4, d_kv=32), "8x16": dict(num_heads=8, d_kv=16), "16x8": dict(num_heads=16, d_kv=8)}


def copy_curve(layout: dict, steps: int, alphabet: int, length: int, lr: float, batch: int, seed: int,
               every: int) -> list[tuple[int, float]]:
    """Training loss of copying random sequences, averaged over each ``every`` steps."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    shape = dict(CPU_MODEL, **layout)
    cfg = T5Config(vocab_size=8192, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   **shape)
    model = T5ForConditionalGeneration(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    curve, acc = [], 0.0
    for step in range(1, steps + 1):
        x = torch.randint(200, 200 + alphabet, (batch, length), generator=gen)  # ids clear of special tokens
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc += loss.item()
        if step % every == 0:
            curve.append((step, round(acc / every, 4)))
            acc = 0.0
    return curve


def main(quick: bool = False, steps: int = 0, alphabet: int = 500, length: int = 20, lr: float = 2e-3,
         batch: int = 16, seed: int = 0, threads: int = 2, layouts: str = "4x32,8x16,16x8") -> None:
    torch.set_num_threads(threads)
    steps = steps or (400 if quick else 1500)
    every = max(1, steps // 10)
    names = [n for n in layouts.split(",") if n]
    results = {}
    for name in names:
        t = time.perf_counter()
        curve = copy_curve(LAYOUTS[name], steps, alphabet, length, lr, batch, seed, every)
        results[name] = curve
        print(json.dumps({"layout": name, "curve": curve, "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    chance = math.log(alphabet)
    print(f"\ncopy loss (chance ln({alphabet}) = {chance:.3f}), {steps} steps, lr {lr}, batch {batch}")
    print("step   " + " ".join(f"{n:>8s}" for n in names))
    for i in range(len(results[names[0]])):
        print(f"{results[names[0]][i][0]:>5d}  " + " ".join(f"{results[n][i][1]:>8.3f}" for n in names))
    final = {n: results[n][-1][1] for n in names}
    best = min(final, key=final.get)
    summary = {"bench": "copy", "ratio": round(final[names[0]] / final[best], 4), "best": best, "loss": final,
               "chance": round(chance, 4), "steps": steps, "alphabet": alphabet, "length": length, "lr": lr}
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire(main)
