"""The server's parts alone, with no model and no HTTP: request parsing, the SSE writer, a route function."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
from types import SimpleNamespace

import pytest

from config import InferConfig
from model.serving.infer import GenerationResult
from model.serving.protocol import (APIError, CompletionIn, Message, Reply, TextCompletionIn, parse_generation,
                                    single_prompt, split_messages)
from model.serving.server import END_OF_PIECES, Job, completion_events, models

CFG = InferConfig(max_new_tokens=48, max_n=3)


def chat_body(**fields) -> CompletionIn:
    return CompletionIn(messages=[{"role": "user", "content": "你好"}], **fields)


def test_temperature_picks_the_search_type():
    assert parse_generation(chat_body(temperature=0), None, CFG).settings["search_type"] == "greedy"
    gen = parse_generation(chat_body(temperature=0.7, n=2, stop="。", seed=3), 8, CFG)
    assert gen.settings["search_type"] == "sampling" and gen.settings["temperature"] == 0.7
    assert (gen.n, gen.stop, gen.extra["seed"], gen.settings["max_new_tokens"]) == (2, ["。"], 3, 8)
    assert "search_type" not in parse_generation(chat_body(), None, CFG).settings  # the folder's default


@pytest.mark.parametrize("fields, max_new, param", [
    ({"n": 4}, None, "n"), ({"stop": list("abcde")}, None, "stop"), ({"stop": [""]}, None, "stop"),
    ({}, 49, "max_tokens"), ({"logit_bias": {"5": 1}}, None, "logit_bias"),
])
def test_parse_generation_refuses_what_the_server_cannot_do(fields, max_new, param):
    with pytest.raises(APIError) as e:
        parse_generation(chat_body(**fields), max_new, CFG)
    assert e.value.status == 400 and e.value.param == param


def test_split_messages_pairs_turns_and_joins_system_text():
    msgs = [Message(role="system", content="甲"), Message(role="user", content="问一"),
            Message(role="assistant", content="答一"), Message(role="developer", content="乙"),
            Message(role="user", content="问二"), Message(role="user", content="问三")]
    assert split_messages(msgs) == ("甲\n乙", [("问一", "答一")], "问二\n问三")
    with pytest.raises(APIError, match="last message"):
        split_messages([Message(role="assistant", content="x")])


def test_single_prompt():
    assert single_prompt(TextCompletionIn(prompt=["一句"])) == "一句"
    with pytest.raises(APIError, match="one string"):
        single_prompt(TextCompletionIn(prompt=["a", "b"]))


def test_reply_shapes_plain_and_chunks():
    results = [GenerationResult("好", [7, 1], 3, "stop")]
    plain = Reply(chat=True, model="m", prompt_tokens=3).body(results)
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["content"] == "好"
    assert plain["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = Reply(chat=False, model="m", prompt_tokens=3)
    event = json.loads(text.chunk(0, "好")[len("data: "):])
    assert event["object"] == "text_completion" and event["choices"][0]["text"] == "好"
    assert event["id"].startswith("cmpl-")


def test_completion_events_order_and_in_band_errors():
    async def run(outcome) -> list[str]:
        fut = concurrent.futures.Future()
        outcome(fut)
        pieces: asyncio.Queue = asyncio.Queue()
        for item in ((0, "你"), (0, "好"), END_OF_PIECES):
            pieces.put_nowait(item)
        closed = []
        reply = Reply(chat=True, model="m", prompt_tokens=2)
        events = completion_events(reply, Job(fut, [], 0.0), pieces, 1, True, lambda: None,
                                   lambda: closed.append(True))
        out = [e async for e in events]
        assert closed == [True]
        return out

    ok = asyncio.run(run(lambda f: f.set_result([GenerationResult("你好", [7, 8, 1], 2, "stop")])))
    data = [json.loads(e[6:]) for e in ok[:-1]]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"].get("content") for d in data[1:3]] == ["你", "好"]
    assert data[3]["choices"][0]["finish_reason"] == "stop" and data[4]["usage"]["completion_tokens"] == 3
    assert ok[-1] == "data: [DONE]\n\n"
    failed = asyncio.run(run(lambda f: f.set_exception(RuntimeError("boom"))))
    assert "generation failed: boom" in failed[-2] and failed[-1] == "data: [DONE]\n\n"


def test_a_route_is_a_plain_function():
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        generations=SimpleNamespace(bot=SimpleNamespace(model_name="tiny")))))
    assert asyncio.run(models(request))["data"][0]["id"] == "tiny"
