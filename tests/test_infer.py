"""ChatBot: streaming equals non-streamed, batch equals single, history budget, cancellation, ct2 engine."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from config import EOS_ID, InferConfig, make_config
from model.serving.infer import ChatBot, GenerationCancelled, PromptTooLong, TokenStreamer
from model.prompt import join_history

PROMPTS = ["你好", "3加5等于多少？", "星期四的后一天是星期几？", "7千米等于多少米？", "怎样保持健康？",
           "十二加九等于多少？", "六月的上一个月是几月？", "你是谁？"]


@pytest.fixture(scope="module")
def bot(toy_model_dir):
    return ChatBot(model_dir=str(toy_model_dir), max_new_tokens=40, repetition_penalty=1.1)


def test_answers_depend_on_the_prompt_and_end(bot):
    answers = bot.chat(PROMPTS)
    assert len(set(answers)) >= 5, answers
    ids = bot.build_input_ids(PROMPTS[0])
    assert bot.generate(ids).finish_reason == "stop"


@pytest.mark.parametrize("search_type", ["greedy", "beam", "contrastive"])
def test_stream_chat_equals_chat(bot, search_type):
    for q in PROMPTS[:4]:
        pieces = list(bot.stream_chat(q, search_type=search_type))
        assert "".join(pieces) == bot.chat(q, search_type=search_type)
    assert len(list(bot.stream_chat(PROMPTS[0]))) > 1  # really streamed, not one final piece


def test_batch_chat_equals_single(bot):
    batch = bot.chat(PROMPTS)
    assert batch == [bot.chat(q) for q in PROMPTS]


def test_sampling_settings_per_request(bot):
    out = bot.chat(PROMPTS[:2], search_type="sampling", temperature=1.5, top_k=20, top_p=0.9)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)


def test_max_new_tokens_per_request_and_finish_reason(bot):
    r = bot.generate(bot.build_input_ids("7千米等于多少米？"), max_new_tokens=3)
    assert r.completion_tokens == 3 and r.finish_reason == "length"
    full = bot.generate(bot.build_input_ids("你好"))
    assert full.ids[-1] == EOS_ID and full.finish_reason == "stop"
    assert full.text == bot.chat("你好")


def test_settings_are_checked(bot):
    with pytest.raises(ValueError, match="unknown generation setting"):
        bot.chat("你好", temprature=0.5)
    with pytest.raises(ValueError, match="search_type"):
        bot.chat("你好", search_type="nucleus")
    with pytest.raises(ValueError, match="top_p"):
        bot.chat("你好", top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        bot.chat("你好", max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown option"):
        make_config(InferConfig, serch_type="greedy")


def test_history_oldest_turns_dropped_first(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), history_tokens=40, max_prompt_tokens=64)
    enc = bot._encode
    history = [(f"问题{i}", f"回答{i}") for i in range(20)]
    ids = bot.build_input_ids("现在的问题", history)
    assert ids[-1] == EOS_ID and ids.count(EOS_ID) == 1
    assert len(ids) <= 64
    # the kept turns are the newest ones, whole, in order, counted turn by turn ("用户：q\n助手：a\n") against
    # history_tokens; the prompt is then the training data's layout (model/prompt.py) encoded whole
    kept, used = [], 0
    for i in range(19, -1, -1):
        n = len(enc(f"用户：问题{i}\n助手：回答{i}\n"))
        if used + n > 40:
            break
        kept.insert(0, history[i])
        used += n
    assert 0 < len(kept) < 20
    want = [("user" if j % 2 == 0 else "assistant", t) for turn in kept for j, t in enumerate(turn)]
    assert ids == bot.tokenizer(join_history(want, "现在的问题"))["input_ids"]
    # a short history is kept entirely, system message first
    ids = bot.build_input_ids("现在", history[:2], system="助手")
    assert ids == bot.tokenizer("系统：助手\n用户：问题0\n助手：回答0\n用户：问题1\n助手：回答1\n用户：现在")["input_ids"]
    # with no history and no system text the prompt is the query alone, as in single-turn training rows
    assert bot.build_input_ids("现在") == enc("现在") + [EOS_ID]
    # history really reaches the model: multi-turn answers go through the same path as single ones
    assert bot.chat("你好", history=history[:1]) == "".join(bot.stream_chat("你好", history=history[:1]))


def test_prompt_over_the_limit(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_prompt_tokens=16)
    long_q = "".join(PROMPTS)
    with pytest.raises(PromptTooLong, match="limit of 16"):
        bot.build_input_ids(long_q, strict=True)
    ids = bot.build_input_ids(long_q)
    assert len(ids) == 16 and ids[-1] == EOS_ID
    assert ids[:-1] == bot._encode(long_q)[-15:]  # the end of the query is kept


class _CancelAfter(TokenStreamer):
    def __init__(self, tokenizer, n, skip_first=True):
        super().__init__(tokenizer, on_text=lambda _p: None, skip_first=skip_first)
        self.n, self.puts = n, 0

    def put(self, value):
        self.puts += 1
        if self.puts > self.n:
            self.cancel.set()
        super().put(value)


def test_cancel_stops_generation(tiny_model_dir):
    # the random tiny model never emits [EOS]: without the cancel it would run all 200 tokens
    bot = ChatBot(model_dir=str(tiny_model_dir), max_new_tokens=200)
    streamer = _CancelAfter(bot.tokenizer, 5)
    with pytest.raises(GenerationCancelled):
        bot.generate(bot.build_input_ids("你好"), streamer=streamer)
    assert streamer.n_tokens == 4  # the first put is the decoder start token

    # closing a stream_chat iterator early cancels its thread too
    ev = threading.Event()
    it = bot.stream_chat("你好", cancel=ev, max_new_tokens=200)
    ev.set()
    assert list(it) == []


def test_stream_chat_closed_early_joins_its_thread(bot):
    before = threading.active_count()
    it = bot.stream_chat("你好", max_new_tokens=40)
    first = next(it)
    assert first
    it.close()
    assert threading.active_count() == before


def test_streamer_holds_back_incomplete_utf8(bot):
    tok = bot.tokenizer
    text = "你好😀𠀀，好𝄞"  # characters outside the tiny vocabulary fall back to byte tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    pieces = []
    s = TokenStreamer(tok, on_text=pieces.append)
    s.put(torch.tensor([[0]]))  # decoder start
    for i in ids + [EOS_ID]:
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


def test_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatBot(model_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown engine"):
        ChatBot(model_dir=str(tmp_path), engine="onnx")


@pytest.fixture(scope="module")
def ct2_bots(toy_model_dir, tmp_path_factory):
    pytest.importorskip("ctranslate2")
    out = tmp_path_factory.mktemp("ct2")
    f32 = ChatBot(model_dir=str(toy_model_dir), engine="ct2", ct2_compute_type="float32", ct2_dir=str(out / "m"),
                  max_new_tokens=40, repetition_penalty=1.1)
    i8 = ChatBot(model_dir=str(toy_model_dir), engine="ct2", ct2_dir=str(out / "m"), max_new_tokens=40,
                 repetition_penalty=1.1)
    return f32, i8


def test_ct2_float32_matches_torch_greedy(bot, ct2_bots):
    f32, i8 = ct2_bots
    assert i8.ct2.compute_type == "int8"
    torch_answers = bot.chat(PROMPTS, repetition_penalty=1.0)
    assert f32.chat(PROMPTS, repetition_penalty=1.0) == torch_answers
    for q in PROMPTS[:3]:
        assert "".join(i8.stream_chat(q)) == i8.chat(q)
    r = i8.generate(i8.build_input_ids("7千米等于多少米？"), max_new_tokens=3)
    assert r.completion_tokens == 3 and r.finish_reason == "length"
    with pytest.raises(ValueError, match="contrastive"):
        i8.chat("你好", search_type="contrastive")


def test_ct2_cancel(ct2_bots):
    _f32, i8 = ct2_bots
    streamer = _CancelAfter(i8.tokenizer, 2, skip_first=False)  # ct2 puts no decoder start token
    with pytest.raises(GenerationCancelled):
        i8.generate(i8.build_input_ids("7千米等于多少米？"), streamer=streamer, max_new_tokens=40)
    assert streamer.n_tokens == 2


def test_chatbot_and_plain_generate_agree_through_the_saved_generation_config(toy_model_dir):
    """The chat defaults live in generation_config.json: plain ``model.generate`` and ChatBot give the same ids;
    a flag overrides the folder."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from config import GENERATION_DEFAULTS, EOS_ID
    saved = json.loads((toy_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    for k, v in GENERATION_DEFAULTS.items():
        assert saved[k] == v, k
    bot = ChatBot(model_dir=str(toy_model_dir), device="cpu")
    assert (bot.cfg.max_new_tokens, bot.cfg.repetition_penalty, bot.cfg.no_repeat_ngram_size) == \
        (saved["max_new_tokens"], saved["repetition_penalty"], saved["no_repeat_ngram_size"])
    model = AutoModelForSeq2SeqLM.from_pretrained(str(toy_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(toy_model_dir))
    for q in ("你好", "3加4等于多少？", "怎样保持健康？", "一二三四五六七八九十"):
        with torch.no_grad():
            plain = model.generate(**tok(q, return_tensors="pt"))[0, 1:].tolist()  # drop the decoder start
        if EOS_ID in plain:
            plain = plain[:plain.index(EOS_ID) + 1]
        assert bot.generate(bot.build_input_ids(q)).ids == plain, q
    assert ChatBot(model_dir=str(toy_model_dir), device="cpu", repetition_penalty=1.0).cfg.repetition_penalty == 1.0
