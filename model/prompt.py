"""The chat prompt layout (the encoder input), defined once for the training data and for ChatBot.

A lone question is the prompt as it is. With history or a system text, every turn sits on its own line,
labelled with its role, and the question comes last::

    系统：<system>
    用户：<question 1>
    助手：<answer 1>
    用户：<question>

The tokenizer then appends ``[EOS]``. ``utils/readers.py`` builds the multi-turn training rows with
``join_history``; ``model/data/sources.py`` maps ``messages``/``conversations`` rows through ``render_messages``;
``ChatBot.build_input_ids`` renders the turns that fit its token budget and encodes the whole prompt.

``CHAT_TEMPLATE`` is the same layout as a Jinja chat template, generated from ``ROLE_LABELS`` and saved in
every tokenizer (``tokenizer_config.json``), so plain transformers builds the same prompt::

    tok.apply_chat_template(messages, add_generation_prompt=True)   # == ChatBot's input ids

``add_generation_prompt=True`` ends the prompt with ``[EOS]`` (the encoder input is complete: the answer is
the decoder's job); without it the text is what a training row's ``prompt`` holds, and the tokenizer appends
``[EOS]`` when encoding it. tests/test_chat_template.py checks that template and functions agree.
"""
from __future__ import annotations

from typing import Optional, Sequence

ROLE_LABELS = {"user": "用户", "assistant": "助手", "system": "系统"}


def turn_line(role: str, text: str) -> str:
    """One turn of the layout: ``用户：text`` (unknown roles keep their own name as the label)."""
    return f"{ROLE_LABELS.get(role, role)}：{text}"


def join_history(history: Sequence[tuple[str, str]], question: str, system: str = "") -> str:
    """The prompt for a question after ``history`` (``[(role, text), ...]``) and an optional system text."""
    return render_messages(to_messages(history, question, system))


def render_messages(messages: Sequence[dict], add_generation_prompt: bool = False, eos_token: str = "[EOS]") -> str:
    """OpenAI-style ``[{"role", "content"}]`` -> the prompt text; what ``CHAT_TEMPLATE`` renders.

    System messages with empty content are left out; a lone user message is the prompt as it is.
    """
    turns = [(str(m["role"]), str(m["content"])) for m in messages
             if not (m["role"] == "system" and not m["content"])]
    if len(turns) == 1 and turns[0][0] == "user":
        text = turns[0][1]
    else:
        text = "\n".join(turn_line(r, t) for r, t in turns)
    return text + (eos_token if add_generation_prompt else "")


def to_messages(history: Sequence[tuple[str, str]], question: str, system: str = "") -> list[dict]:
    """The messages that :func:`join_history` lays out (``history``: ``[(role, text), ...]``)."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": r, "content": t} for r, t in history]
    return msgs + [{"role": "user", "content": question}]


def _jinja_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _build_template() -> str:
    labels = "".join(f"{{%- elif m['role'] == {_jinja_str(r)} %}}{{{{ {_jinja_str(lab)} }}}}"
                     for r, lab in ROLE_LABELS.items())
    return (
        "{#- model/prompt.py layout: a lone user message as it is; otherwise one line per turn, labelled -#}"
        "{%- set ns = namespace(turns=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if not (m['role'] == 'system' and not m['content']) -%}{%- set ns.turns = ns.turns + [m] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.turns | length == 1 and ns.turns[0]['role'] == 'user' -%}{{ ns.turns[0]['content'] }}"
        "{%- else -%}{%- for m in ns.turns -%}"
        "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
        "{%- if false %}" + labels + "{%- else %}{{ m['role'] }}{%- endif -%}"
        "{{ '：' }}{{ m['content'] }}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if add_generation_prompt %}{{ eos_token }}{% endif -%}"
    )


CHAT_TEMPLATE = _build_template()


def render_chat(messages: Sequence[dict], template: Optional[str] = None, add_generation_prompt: bool = False,
                eos_token: str = "[EOS]") -> str:
    """The prompt text through a tokenizer's chat template: this module's layout when ``template`` is None or
    ``CHAT_TEMPLATE``; a folder's own (different) template is rendered with transformers' Jinja renderer."""
    if template is None or template == CHAT_TEMPLATE:
        return render_messages(messages, add_generation_prompt, eos_token)
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, eos_token=eos_token)
    return rendered[0]
