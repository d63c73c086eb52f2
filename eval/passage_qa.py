"""Questions whose answer is a span of a given passage (SQuAD-style files such as cmrc2018 dev): the chat
prompt type that copying serves. Each prompt carries the sentences around the answer, cut to fit a short
encoder; an answer counts when it contains a gold span."""
from __future__ import annotations

import json
import re
from pathlib import Path

PROMPT = "阅读短文，回答问题。\n短文：{passage}\n问题：{question}"
_SENTENCE = re.compile(r"[^。！？!?]*[。！？!?]?")


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``."""
    out, pos = [], 0
    for m in _SENTENCE.finditer(text):
        if m.end() > m.start():
            out.append((m.start(), m.end()))
        pos = m.end()
    return out


def passage_around(context: str, start: int, length: int, max_chars: int) -> str | None:
    """The sentences holding ``context[start:start+length]``, widened by neighbours while under ``max_chars``;
    None when the answer's own sentences are longer than that."""
    spans = _sentences(context)
    inside = [i for i, (a, b) in enumerate(spans) if a < start + length and b > start]
    if not inside:
        return None
    lo, hi = inside[0], inside[-1]
    if spans[hi][1] - spans[lo][0] > max_chars:
        return None
    while True:
        grown = False
        if hi + 1 < len(spans) and spans[hi + 1][1] - spans[lo][0] <= max_chars:
            hi, grown = hi + 1, True
        if lo > 0 and spans[hi][1] - spans[lo - 1][0] <= max_chars:
            lo, grown = lo - 1, True
        if not grown:
            return context[spans[lo][0]: spans[hi][1]].strip()


def passage_questions(path: str | Path, n: int, max_chars: int = 96) -> list[dict]:
    """The first ``n`` answerable questions of a SQuAD-style file whose passage fits ``max_chars``:
    ``{"prompt", "answers", "id"}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for article in data.get("data", []):
        for para in article.get("paragraphs", []):
            context = para.get("context", "")
            for qa in para.get("qas", []):
                answers = [a for a in qa.get("answers", []) if a.get("text")]
                if not answers or len(out) >= n:
                    continue
                a = answers[0]
                start = int(a.get("answer_start", -1))
                if context[start: start + len(a["text"])] != a["text"]:
                    start = context.find(a["text"])
                if start < 0:
                    continue
                passage = passage_around(context, start, len(a["text"]), max_chars)
                if passage and a["text"] in passage:
                    out.append({"id": qa.get("id", ""), "answers": sorted({x["text"] for x in answers}),
                                "prompt": PROMPT.format(passage=passage, question=qa["question"])})
    return out


def contains_gold(answer: str, golds: list[str]) -> bool:
    return any(g and g in answer for g in golds)
