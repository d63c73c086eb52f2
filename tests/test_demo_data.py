"""The embedded demo data: the held-out questions are never trained on, in any generated file; every other
combination of their templates and operands is."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from utils.demo_data import HELDOUT, HELDOUT_CORES, SEED, corpus_lines, sft_split, write_demo_data


def _all_texts(paths: dict) -> list[str]:
    """Every string of every file write_demo_data writes, except heldout.json itself."""
    texts = Path(paths["corpus"]).read_text(encoding="utf-8").splitlines()
    for key in ("sft", "sft_valid", "dpo"):
        df = pd.read_parquet(paths[key])
        texts += [str(v) for col in df.columns for v in df[col]]
    texts += Path(paths["ie"]).read_text(encoding="utf-8").splitlines()
    for csv in Path(paths["ceval"]).rglob("*.csv"):
        df = pd.read_csv(csv)
        texts += [str(v) for col in df.columns for v in df[col]]
    return texts


def _norm(s: str) -> str:
    return re.sub(r"[\s？?。，,！!：:]", "", s)


def test_the_three_heldout_questions_are_fixed():
    assert [(h["prompt"], h["expect"]) for h in HELDOUT] == [
        ("3加5等于多少？", "3加5等于8"), ("7千米等于多少米？", "7000米"), ("星期四的后一天是星期几？", "星期五")]


def test_heldout_questions_never_appear_in_any_generated_file(tmp_path):
    paths = write_demo_data(tmp_path / "demo")
    texts = _all_texts(paths)
    assert len(texts) > 3000
    joined = "\n".join(_norm(t) for t in texts)
    for h, core in zip(HELDOUT, HELDOUT_CORES):
        assert core in _norm(h["prompt"])
        assert _norm(h["prompt"]) not in joined
        assert core not in joined, core  # the template with the held-out operands, in a prompt or an answer
    assert "3加5等于8" not in joined and "5加3等于8" in joined
    held = json.loads(Path(paths["heldout"]).read_text(encoding="utf-8"))
    assert held == HELDOUT


def test_every_other_combination_of_heldout_templates_and_operands_is_trained_on():
    train, valid = sft_split(SEED)
    prompts = {p for p, _ in train}
    # the held-out templates with every other operand
    assert all(f"{a}加{b}等于多少？" in prompts for a in range(10) for b in range(10) if (a, b) != (3, 5))
    assert all(f"{n}千米等于多少米？" in prompts for n in range(1, 13) if n != 7)
    for d in ("星期一", "星期二", "星期三", "星期五", "星期六", "星期日"):
        assert f"{d}的后一天是星期几？" in prompts
    # the held-out facts in other templates
    facts = dict(train)
    assert facts["3加5是多少？"] == "3加5是8。" and facts["3与5的和是多少？"] == "3与5的和是8。"
    assert facts["7千米是多少米？"] == "7千米是7000米。"
    assert facts["星期四的下一天是星期几？"] == "星期四的下一天是星期五。"
    assert not {p for p, _ in valid} & prompts  # validation pairs are not trained on


def test_demo_data_is_deterministic():
    assert sft_split(SEED) == sft_split(SEED)
    assert corpus_lines(SEED) == corpus_lines(SEED)
