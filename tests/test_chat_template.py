"""The chat template saved in every tokenizer is the prompt layout of model/prompt.py: plain transformers'
``apply_chat_template`` feeds the model exactly what ChatBot (the CLI, the API) feeds it."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from config import EOS_ID
from model.serving.infer import ChatBot
from model.prompt import CHAT_TEMPLATE, join_history, render_chat, render_messages, to_messages

TURNS = [("你好", "你好！有什么可以帮你？"), ("3加5等于多少？", "8"), ("星期四的后一天是星期几？", "星期五")]


def _messages(history, query, system):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": query}]


def test_template_and_python_layout_agree():
    from transformers.utils.chat_template_utils import render_jinja_template
    rng = random.Random(0)
    pieces = ["你好", "a\"b", "x\\ny", "换\n行", "", " 空格 ", "{{ x }}", "：", "[EOS]"]
    roles = ["user", "assistant", "system", "tool"]
    for _ in range(200):
        msgs = [{"role": rng.choice(roles), "content": rng.choice(pieces) + rng.choice(pieces)}
                for _ in range(rng.randint(1, 6))]
        for gen in (False, True):
            (jinja,), _ = render_jinja_template(conversations=[msgs], chat_template=CHAT_TEMPLATE,
                                                add_generation_prompt=gen, eos_token="[EOS]")
            assert jinja == render_messages(msgs, gen), msgs
    hist = [("user", "问"), ("assistant", "答")]
    assert join_history(hist, "再问", "系统话") == render_messages(to_messages(hist, "再问", "系统话")) \
        == "系统：系统话\n用户：问\n助手：答\n用户：再问"
    assert join_history([], "单独的问题") == "单独的问题"


def test_saved_tokenizers_carry_the_template(toy_model_dir, tiny_tokenizer, tmp_path):
    cfg = json.loads((toy_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == CHAT_TEMPLATE
    from model.tokenizer.build import save_tokenizer
    out = save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    assert json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("system", ["", "你是一个乐于助人的助手。"])
@pytest.mark.parametrize("n_turns", [1, 2, 3])
def test_apply_chat_template_equals_chatbot_and_plain_generate_gives_the_cli_answer(toy_model_dir, n_turns,
                                                                                    system):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(toy_model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(toy_model_dir)).eval()  # its generation_config.json
    bot = _bot(toy_model_dir)
    history, query = TURNS[:n_turns - 1], TURNS[n_turns - 1][0]
    msgs = _messages(history, query, system)
    plain_ids = tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    ids = bot.build_input_ids(query, history, system)
    assert plain_ids == ids
    assert ids[-1] == EOS_ID and ids.count(EOS_ID) == 1
    # the training rows' prompt text is the same rendering; the tokenizer appends the [EOS]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == join_history([(r, t) for u, a in history for r, t in (("user", u), ("assistant", a))], query,
                                system)
    assert tok(text)["input_ids"] == ids
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([plain_ids]))[0, 1:].tolist()  # drop the decoder start
    if EOS_ID in out:
        out = out[:out.index(EOS_ID) + 1]
    assert bot.generate(ids).ids == out
    answer = tok.decode(out, skip_special_tokens=True)
    assert answer == bot.chat(query, history=history, system=system or None)
    assert answer == "".join(bot.stream_chat(query, history=history, system=system or None))  # the CLI's path


_BOTS: dict = {}


def _bot(folder):
    if str(folder) not in _BOTS:
        _BOTS[str(folder)] = ChatBot(model_dir=str(folder), device="cpu")
    return _BOTS[str(folder)]


def test_folder_without_template_falls_back_to_the_same_layout(toy_model_dir, tmp_path):
    old = tmp_path / "old_model"
    shutil.copytree(toy_model_dir, old)
    cfg_path = old / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template")
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (old / "chat_template.jinja").unlink(missing_ok=True)
    bot = ChatBot(model_dir=str(old), device="cpu")
    assert not getattr(bot.tokenizer, "chat_template", None)
    new = _bot(toy_model_dir)
    for n in (1, 2, 3):
        args = (TURNS[n - 1][0], TURNS[:n - 1], "系统")
        assert bot.build_input_ids(*args) == new.build_input_ids(*args)


def test_a_folder_with_its_own_template_is_rendered_through_it():
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(msgs, custom) == "<user>a<assistant>b"
    assert render_chat(msgs, CHAT_TEMPLATE) == render_chat(msgs, None) == "用户：a\n助手：b"
