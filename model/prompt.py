"""The chat prompt layout (the encoder input), defined once for the training data and for ChatBot.

A lone question is the prompt as it is. With history or a system text, every turn sits on its own line,
labelled with its role, and the question comes last::

    系统：<system>
    用户：<question 1>
    助手：<answer 1>
    用户：<question>

The tokenizer then appends ``[EOS]``. ``utils/readers.py`` builds the multi-turn training rows with
``join_history``; ``ChatBot.build_input_ids`` encodes the same lines piece by piece to fit a token budget.
"""
from __future__ import annotations

from typing import Sequence

ROLE_LABELS = {"user": "用户", "assistant": "助手", "system": "系统"}


def turn_line(role: str, text: str) -> str:
    """One turn of the layout: ``用户：text`` (unknown roles keep their own name as the label)."""
    return f"{ROLE_LABELS.get(role, role)}：{text}"


def join_history(history: Sequence[tuple[str, str]], question: str, system: str = "") -> str:
    """The prompt for a question after ``history`` (``[(role, text), ...]``) and an optional system text."""
    if not history and not system:
        return question
    lines = [turn_line("system", system)] if system else []
    lines += [turn_line(r, t) for r, t in history]
    lines.append(turn_line("user", question))
    return "\n".join(lines)
