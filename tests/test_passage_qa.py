"""Passage questions for the chat stage (eval/passage_qa.py): the answer's sentences, widened to fit."""
from __future__ import annotations

import json

from eval.passage_qa import contains_gold, passage_around, passage_questions

CONTEXT = "长城是古代的军事工程。它东起山海关。西至嘉峪关，全长两万多里！今天它是著名的景点。"


def test_passage_holds_the_answer_and_fits():
    start = CONTEXT.index("山海关")
    assert passage_around(CONTEXT, start, 3, 9) == "它东起山海关。"  # only the answer's sentence fits 9 chars
    wide = passage_around(CONTEXT, start, 3, 30)
    # widened sentence by sentence (the next one first) while it stays within 30 characters
    assert wide == "它东起山海关。西至嘉峪关，全长两万多里！今天它是著名的景点。" and len(wide) <= 30
    assert passage_around(CONTEXT, start, 3, 60) == CONTEXT
    assert passage_around(CONTEXT, start, 3, 5) is None  # the answer's own sentence is longer than that


def test_questions_from_a_squad_file(tmp_path):
    data = {"data": [{"paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "长城东起哪里？", "answers": [{"text": "山海关", "answer_start": CONTEXT.index("山海关")}]},
        {"id": "q2", "question": "长城西至哪里？", "answers": [{"text": "嘉峪关", "answer_start": 0}]},  # wrong offset
        {"id": "q3", "question": "没有答案？", "answers": []}]}]}]}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    qs = passage_questions(p, 5, max_chars=30)
    assert [q["id"] for q in qs] == ["q1", "q2"]  # a wrong offset is found by search; no answer: skipped
    assert qs[0]["answers"] == ["山海关"] and "山海关" in qs[0]["prompt"] and qs[0]["prompt"].endswith("长城东起哪里？")
    assert len(passage_questions(p, 1, max_chars=30)) == 1
    assert contains_gold("它在山海关附近", ["山海关"]) and not contains_gold("不知道", ["山海关", ""])


def test_the_chat_stage_counts_answers_holding_a_gold_span(tmp_path):
    import pipeline
    from config import PIPELINE_PROFILES, PipelineConfig, make_config
    data = {"data": [{"paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "长城东起哪里？", "answers": [{"text": "山海关", "answer_start": CONTEXT.index("山海关")}]},
        {"id": "q2", "question": "长城西至哪里？", "answers": [{"text": "嘉峪关", "answer_start": CONTEXT.index("嘉峪关")}]}]}]}]}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    class Bot:  # answers the first question with its span, the second with something else
        def chat(self, prompts):
            return ["东起山海关。" if "东起哪里" in q else "不知道" for q in prompts]

    cfg = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, passage_file=str(p), passage_questions=5)
    got = pipeline.passage_chats(Bot(), cfg)
    assert got["n"] == 2 and got["contains_gold"] == 1
    assert [q["contains_gold"] for q in got["questions"]] == [True, False]
