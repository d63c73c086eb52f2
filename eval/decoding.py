"""Choose a model folder's chat decoding defaults on held-out prompts, not on the prompts a report shows.

Answers greedy-decoded from a small model loop (one token makes up most of the answer). Each setting of the
grid (repetition penalty x no-repeat n-gram size) answers the same held-out prompts, and the table gives the
share of degenerate answers (one token over 30% of the answer's tokens, model/quality.py), distinct-2 over all
answers and the mean answer length. ``--write=True`` saves the mildest setting with no more degenerate answers
than ``max_degenerate`` into the folder's generation_config.json, which ChatBot, the API and plain
``model.generate`` all read.

    python eval/decoding.py --model_dir=model_save/cpu --prompts=model_save/cpu/data/my_valid_dataset.parquet
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from config import run_cli

PENALTIES = (1.0, 1.15, 1.3, 1.5, 1.8)
NGRAMS = (0, 3, 4)


def held_out_prompts(path: str, n: int, skip: int = 0) -> list[str]:
    """The first ``n`` distinct prompts (after ``skip``) of a prompt/response file any source reader takes."""
    from model.data.sources import iter_records
    seen: list[str] = []
    for where, rec, error in iter_records(path):
        if error or not isinstance((rec or {}).get("prompt"), str):
            raise SystemExit(f"{where}: field prompt: expected a string ({error or 'missing'})")
        p = rec["prompt"].strip()
        if p and p not in seen:
            seen.append(p)
        if len(seen) >= n + skip:
            break
    if len(seen) <= skip:
        raise SystemExit(f"{path}: found {len(seen)} prompts, need more than skip={skip}")
    return seen[skip:]


def sweep(bot, prompts: list[str], penalties=PENALTIES, ngrams=NGRAMS, max_new_tokens: int = 64) -> list[dict]:
    from model.quality import distinct_n, is_degenerate
    rows = []
    for ngram in ngrams:
        for pen in penalties:
            answers = bot.chat(prompts, repetition_penalty=pen, no_repeat_ngram_size=ngram,
                               max_new_tokens=max_new_tokens)
            ids = [bot.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
            rows.append({"repetition_penalty": pen, "no_repeat_ngram_size": ngram,
                         "degenerate": sum(map(is_degenerate, ids)), "answers": len(ids),
                         "distinct_2": round(distinct_n(ids, 2), 4),
                         "mean_tokens": round(sum(map(len, ids)) / max(len(ids), 1), 1)})
    return rows


def mildest(rows: list[dict], max_degenerate: float) -> dict:
    """The setting with the smallest penalty, then the largest n-gram, whose degenerate share is within bounds
    (else the one with the fewest degenerate answers)."""
    ok = [r for r in rows if r["degenerate"] <= max_degenerate * r["answers"]]
    if not ok:
        return min(rows, key=lambda r: (r["degenerate"], r["repetition_penalty"]))
    return min(ok, key=lambda r: (r["repetition_penalty"], -(r["no_repeat_ngram_size"] or 99)))


def choose(model_dir: str = "model_save/cpu", prompts: str = "", n: int = 64, skip: int = 0,
           max_new_tokens: int = 64, max_degenerate: float = 0.05, write: bool = False, out: str = "",
           num_threads: int = 2) -> dict:
    """Sweep the grid on ``n`` held-out prompts; print the table and the chosen setting (saved with --write)."""
    import torch
    from model.serving.infer import ChatBot
    torch.set_num_threads(num_threads)
    if not prompts:
        raise SystemExit("--prompts: a held-out prompt/response file (e.g. <root>/data/my_valid_dataset.parquet)")
    bot = ChatBot(model_dir=model_dir)
    rows = sweep(bot, held_out_prompts(prompts, n, skip), max_new_tokens=max_new_tokens)
    print(f"{'penalty':>8s} {'ngram':>6s} {'degenerate':>11s} {'distinct-2':>11s} {'tokens':>7s}")
    for r in rows:
        print(f"{r['repetition_penalty']:>8.2f} {r['no_repeat_ngram_size']:>6d} "
              f"{r['degenerate']:>5d} / {r['answers']:<3d} {r['distinct_2']:>11.3f} {r['mean_tokens']:>7.1f}")
    best = mildest(rows, max_degenerate)
    result = {"model_dir": model_dir, "prompts": prompts, "n": n, "skip": skip, "grid": rows,
              "max_degenerate": max_degenerate,
              "chosen": {k: best[k] for k in ("repetition_penalty", "no_repeat_ngram_size")}}
    print(f"chosen: {json.dumps(result['chosen'])} ({best['degenerate']} of {best['answers']} degenerate)")
    if write:
        path = Path(model_dir) / "generation_config.json"
        gen = json.loads(path.read_text(encoding="utf-8"))
        gen.update(result["chosen"])
        path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"saved in {path}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return result


@functools.wraps(choose)
def main(*args, **kw) -> None:
    choose(*args, **kw)  # the command line prints the table only


if __name__ == "__main__":
    run_cli(main)
