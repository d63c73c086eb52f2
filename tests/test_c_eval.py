"""C-Eval harness: choice logic against hand-computed logits, CSV reading, prompts, results, shared data."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from config import EOS_ID, PAD_ID
from eval.c_eval import (CEvalConfig, Question, choose_from_logits, encode_prompt, load_split, option_token_ids,
                         parse_choice, read_subject_csv, run_ceval, score_questions, summarize)
from helpers import require_shared_data


# ------------------------------------------------------------------------------ choice from logits
def test_choose_from_logits_hand_computed():
    logits = torch.full((2, 10), -5.0)
    # row 0: options (ids 3,5,7,9) = 1, 2, 0, -1 and a huge non-option logit that must be ignored
    logits[0, [3, 5, 7, 9]] = torch.tensor([1.0, 2.0, 0.0, -1.0])
    logits[0, 4] = 100.0
    # row 1: C is best
    logits[1, [3, 5, 7, 9]] = torch.tensor([0.5, 0.5, 3.0, 0.5])
    letters, probs = choose_from_logits(logits, [3, 5, 7, 9])
    assert letters == ["B", "C"]
    z = math.exp(1) + math.exp(2) + math.exp(0) + math.exp(-1)
    expect = [math.exp(1) / z, math.exp(2) / z, 1 / z, math.exp(-1) / z]
    assert probs[0].tolist() == pytest.approx(expect, abs=1e-6)
    z1 = 3 * math.exp(0.5) + math.exp(3.0)
    assert probs[1, 2].item() == pytest.approx(math.exp(3.0) / z1, abs=1e-6)


def test_choose_from_logits_tie_goes_to_earlier_letter_and_option_order_matters():
    logits = torch.zeros(1, 6)
    logits[0, [2, 4]] = 1.0
    assert choose_from_logits(logits, [1, 2, 3, 4])[0] == ["B"]
    # the same logits read through another letter->id mapping give another letter
    assert choose_from_logits(logits, [4, 1, 2, 3])[0] == ["A"]
    # five options (A..E) work too
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 2.0]])
    assert choose_from_logits(logits, [1, 2, 3, 4, 5], "ABCDE")[0] == ["E"]


def test_option_token_ids_distinct(tiny_tokenizer):
    ids = option_token_ids(tiny_tokenizer, "ABCD")
    assert len(set(ids)) == 4 and EOS_ID not in ids and PAD_ID not in ids


# ----------------------------------------------------------------------------------- parse answers
@pytest.mark.parametrize("text,expect", [
    ("答案是C", "C"),
    ("答案：Ｂ", "B"),          # full-width letter
    ("（A）因为……", "A"),
    ("B. 东边", "B"),
    ("我选D。", "D"),
    ("我认为正确的是 C 选项", "C"),
    ("东边", "B"),              # no letter: the option's text
    ("太阳从 东 边 升起", "B"),  # extra spaces
    ("ABC", None),              # no standalone letter
    ("", None),
    ("不知道", None),
])
def test_parse_choice(text, expect):
    assert parse_choice(text, ["西边", "东边", "南边", "北边"]) == expect


def test_parse_choice_prefers_longest_matching_option():
    assert parse_choice("一千米", ["千米", "一千米", "米", "厘米"]) == "B"


# ------------------------------------------------------------------------------------- CSV reading
def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_read_subject_csv_header_case_bad_rows_and_na(tmp_path):
    p = tmp_path / "val" / "law_val.csv"
    _write(p, "\ufeffID,Question,a,b,c,d,Answer\n"
              "0,问题一,NA,None,是,否,a\n"      # NA/None are option texts, lower-case answer
              "1,问题二,x,,z,w,B\n"             # empty option: skipped
              "2,问题三,x,y,z,w,E\n"            # answer not an option letter: skipped
              "3,,x,y,z,w,A\n"                  # empty question: skipped
              "4,问题五,x,y,z,w,Ｃ\n")          # full-width answer letter
    sub = read_subject_csv(p)
    assert sub.name == "law" and sub.skipped == 3
    assert [q.qid for q in sub.questions] == ["0", "4"]
    assert sub.questions[0].options == ["NA", "None", "是", "否"]
    assert [q.answer for q in sub.questions] == ["A", "C"]


def test_read_subject_csv_errors_name_the_file(tmp_path):
    p = tmp_path / "x_val.csv"
    _write(p, "id,text,A,B\n0,q,a,b\n")
    with pytest.raises(ValueError, match="x_val.csv.*question"):
        read_subject_csv(p)
    _write(p, "id,question,answer\n0,q,A\n")
    with pytest.raises(ValueError, match="x_val.csv.*option columns"):
        read_subject_csv(p)


# ---------------------------------------------------------------------------------------- prompts
def test_encode_prompt_drops_shots_then_cuts_head(tiny_tokenizer):
    q = Question("s", "0", "问题" * 5, ["甲", "乙", "丙", "丁"], "A")
    shots = [Question("s", str(i), "例题" * 10, ["甲", "乙", "丙", "丁"], "B") for i in range(3)]
    full, n, trunc = encode_prompt(tiny_tokenizer, q, shots, "", 10_000)
    assert n == 3 and not trunc and full[-1] == EOS_ID and full.count(EOS_ID) == 1
    zero, _, _ = encode_prompt(tiny_tokenizer, q, [], "", 10_000)
    # room for the question and one shot only
    one, _, _ = encode_prompt(tiny_tokenizer, q, shots[:1], "", 10_000)
    ids, n, trunc = encode_prompt(tiny_tokenizer, q, shots, "", len(one))
    assert n == 1 and not trunc and ids == one
    # not even room for the bare question: its head is cut, the end (options, 答案：, [EOS]) is kept
    ids, n, trunc = encode_prompt(tiny_tokenizer, q, shots, "", len(zero) - 4)
    assert n == 0 and trunc and len(ids) == len(zero) - 4 and ids == zero[4:]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True).endswith("答案：")


# --------------------------------------------------------------------- pipeline with a stub model
class AlwaysLetter(torch.nn.Module):
    """First-step logits that favour one token id; checks the decoder starts from [PAD]."""

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.token_id, self.vocab, self.calls = token_id, vocab, 0

    def forward(self, input_ids, attention_mask, decoder_input_ids, use_cache=False):
        assert decoder_input_ids.shape == (input_ids.shape[0], 1)
        assert (decoder_input_ids == PAD_ID).all()
        assert (input_ids[attention_mask == 0] == PAD_ID).all()
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, 0, self.token_id] = 5.0
        return SimpleNamespace(logits=logits)


def _mini_ceval(root: Path):
    _write(root / "val" / "physics_val.csv",
           "id,question,A,B,C,D,answer\n0,q0,a,b,c,d,B\n1,q1,a,b,c,d,B\n2,q2,a,b,c,d,A\n3,q3,a,b,c,d,C\n")
    _write(root / "val" / "history_val.csv",
           "Id,Question,A,B,C,D,Answer\n0,q0,a,b,c,d,D\n1,q1,a,b,c,d,D\n2,q2,a,b,c,d,B\n")
    _write(root / "val" / "art_val.csv", "id,question,A,B,C,D,answer\n0,q0,a,b,c,d,B\n")
    _write(root / "test" / "physics_test.csv", "id,question,A,B,C,D\n7,q7,a,b,c,d\n8,q8,a,b,c,d\n")
    for s in ("physics", "history", "art"):
        _write(root / "dev" / f"{s}_dev.csv", "id,question,A,B,C,D,answer\n0,例,a,b,c,d,A\n1,例,a,b,c,d,B\n")
    _write(root / "subject_mapping.json", json.dumps({
        "physics": ["Physics", "物理", "STEM"], "history": ["History", "历史", "Humanities"],
        "art": ["Art", "艺术", "Humanities"]}))


def test_score_and_summarize_with_stub_model(tmp_path, tiny_tokenizer):
    root = tmp_path / "ceval"
    _mini_ceval(root)
    b_id = option_token_ids(tiny_tokenizer)[1]
    model = AlwaysLetter(b_id, len(tiny_tokenizer))
    cfg = CEvalConfig(data_dir=str(root), batch_size=2, out_dir=str(tmp_path / "out"), show_table=False)
    summary = run_ceval(cfg, model=model, tokenizer=tiny_tokenizer, progress=False)
    ps = summary["per_subject"]
    assert ps["physics"]["accuracy"] == pytest.approx(2 / 4)
    assert ps["history"]["accuracy"] == pytest.approx(1 / 3)
    assert ps["art"]["accuracy"] == pytest.approx(1.0)
    cats = summary["per_category"]
    assert list(cats) == ["STEM", "Humanities"]
    assert cats["Humanities"]["accuracy"] == pytest.approx((1 / 3 + 1) / 2)  # macro over subjects
    assert cats["Humanities"]["micro_accuracy"] == pytest.approx(2 / 4)
    o = summary["overall"]
    assert o["accuracy"] == pytest.approx((0.5 + 1 / 3 + 1) / 3) and o["micro_accuracy"] == pytest.approx(4 / 8)
    assert o["pred_distribution"] == {"B": 8} and model.calls == 4  # 8 questions in batches of 2
    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["per_subject"]["physics"]["correct"] == 2
    rows = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("level,name") and len(rows) == 1 + 3 + 2 + 1
    assert not (out / "submission.json").exists()

    # k-shot prompts carry the dev examples; the test split (no answers) yields a submission file
    cfg_test = CEvalConfig(data_dir=str(root), split="test", k_shot=2, out_dir=str(tmp_path / "out_test"),
                           show_table=False)
    summary = run_ceval(cfg_test, model=model, tokenizer=tiny_tokenizer, progress=False)
    assert summary["unanswered_questions"] == 2 and summary["overall"]["n"] == 0
    sub = json.loads((tmp_path / "out_test" / "submission.json").read_text(encoding="utf-8"))
    assert sub == {"physics": {"7": "B", "8": "B"}}


def test_k_shot_prompts_and_missing_dev(tmp_path, tiny_tokenizer):
    root = tmp_path / "ceval"
    _mini_ceval(root)
    subjects = load_split(root, "val", ["physics"])
    dev = {s.name: s for s in load_split(root, "dev")}
    seen = []

    class Spy(AlwaysLetter):
        def forward(self, input_ids, attention_mask, decoder_input_ids, use_cache=False):
            seen.extend(tiny_tokenizer.batch_decode(input_ids, skip_special_tokens=True))
            return super().forward(input_ids, attention_mask, decoder_input_ids, use_cache)

    model = Spy(option_token_ids(tiny_tokenizer)[0], len(tiny_tokenizer))
    recs = score_questions(model, tiny_tokenizer, subjects, dev, CEvalConfig(k_shot=2), progress=False)
    assert all(r["shots"] == 2 for r in recs) and len(seen) == 4
    assert all(s.count("答案：") == 3 and "答案：A" in s and "答案：B" in s and "物理" in s for s in seen)
    with pytest.raises(FileNotFoundError, match="dev"):
        score_questions(model, tiny_tokenizer, subjects, None, CEvalConfig(k_shot=1), progress=False)


def test_summarize_unmapped_subjects():
    from eval.c_eval import Subject
    subs = [Subject("x", [Question("x", "0", "q", list("abcd"), "A")])]
    recs = [{"subject": "x", "id": "0", "answer": "A", "pred": "", "correct": False, "truncated": False}]
    s = summarize(recs, subs)
    assert s["per_subject"]["x"]["category"] == "Unmapped" and s["per_subject"]["x"]["unparsed"] == 1


# ------------------------------------------------------------------------------------ real models
def test_demo_ceval_logits_and_generate(demo_data, tiny_model_dir, tmp_path):
    for mode in ("logits", "generate"):
        cfg = CEvalConfig(model_dir=str(tiny_model_dir), data_dir=str(demo_data["ceval"]), mode=mode, k_shot=1,
                          max_new_tokens=4, out_dir=str(tmp_path / mode), show_table=False, num_threads=1)
        s = run_ceval(cfg, progress=False)
        assert s["overall"]["subjects"] == 2 and s["overall"]["n"] == 6
        assert set(s["per_category"]) == {"STEM", "Other"}
        assert (tmp_path / mode / "predictions.csv").is_file()


def test_ceval_val_random_init_within_chance(tiny_model_dir, tmp_path):
    data = require_shared_data("eval/ceval-exam")
    cfg = CEvalConfig(model_dir=str(tiny_model_dir), data_dir=str(data), split="val", batch_size=64,
                      max_source_len=192, out_dir=str(tmp_path), show_table=False, num_threads=1)
    s = run_ceval(cfg, progress=False)
    o = s["overall"]
    assert o["subjects"] == 52 and o["n"] == 1346 and s["skipped_rows"] == 0
    assert set(s["per_category"]) == {"STEM", "Social Science", "Humanities", "Other"}
    assert sum(v["subjects"] for v in s["per_category"].values()) == 52
    assert o["within_chance"], o
