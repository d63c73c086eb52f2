"""Decoding defaults chosen on held-out prompts (eval/decoding.py): the rule, the saved folder, the report."""
from __future__ import annotations

import json
import shutil

from eval.decoding import choose, mildest


def _row(pen, ngram, degenerate, answers=20):
    return {"repetition_penalty": pen, "no_repeat_ngram_size": ngram, "degenerate": degenerate, "answers": answers}


def test_mildest_setting_within_the_bound_wins():
    rows = [_row(1.0, 0, 9), _row(1.15, 0, 2), _row(1.15, 3, 1), _row(1.15, 4, 1), _row(1.5, 0, 0)]
    # 5% of 20 answers allows 1: the smallest penalty that gets there, and of its n-gram sizes the largest
    assert mildest(rows, 0.05) == rows[3]
    assert mildest(rows, 0.10) == rows[1]  # 2 of 20 allowed: no n-gram block needed (0 = off is mildest)
    # nothing within the bound: the fewest degenerate answers
    assert mildest([_row(1.0, 0, 9), _row(1.3, 3, 4)], 0.0) == _row(1.3, 3, 4)


def test_choose_writes_the_setting_that_chatbot_then_uses(toy_model_dir, demo_data, tmp_path):
    from model.serving.infer import ChatBot
    folder = tmp_path / "model"
    shutil.copytree(toy_model_dir, folder)
    result = choose(model_dir=str(folder), prompts=demo_data["sft"], n=6, max_new_tokens=12, write=True,
                    out=str(tmp_path / "decoding.json"), num_threads=1)
    assert len(result["grid"]) == 15 and all(r["answers"] == 6 for r in result["grid"])
    chosen = result["chosen"]
    assert chosen == {k: mildest(result["grid"], 0.05)[k] for k in chosen}
    saved = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert {k: saved[k] for k in chosen} == chosen
    bot = ChatBot(model_dir=str(folder))
    assert bot.cfg.repetition_penalty == chosen["repetition_penalty"]
    assert bot.cfg.no_repeat_ngram_size == chosen["no_repeat_ngram_size"]
    assert json.loads((tmp_path / "decoding.json").read_text(encoding="utf-8"))["chosen"] == chosen
