"""Chat over real HTTP (uvicorn on 127.0.0.1, a free port) with httpx and the openai client: the reference's
/api/chat, /v1/chat/completions plain and streamed, multi-turn, concurrent streams, bad chat bodies, the demo."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import openai_client, wait_for

from model.serving.infer import ChatBot
from model.serving.server import ServerThread, get_state, sample_exchange

PROMPTS = ["你好", "3加5等于多少？", "星期四的后一天是星期几？", "7千米等于多少米？", "怎样保持健康？",
           "十二加九等于多少？", "六月的上一个月是几月？", "你是谁？", "今天心情不好怎么办？", "2加2等于多少？",
           "五月的下一个月是几月？", "3千克等于多少克？", "星期一的前一天是星期几？", "9加7等于多少？",
           "怎样学习中文？", "二十加一等于多少？"]


@pytest.fixture(scope="module")
def bot(toy_model_dir):
    """In float64: answers served in a shared batch are compared with answers computed alone, and only float64
    round-off is small enough that no near tie between two tokens can flip on another CPU."""
    b = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=48, max_concurrency=4, max_queue=16,
                max_prompt_tokens=64)
    b.model.double()
    return b


def test_reference_endpoint_unchanged(client, bot):
    r = client.post("/api/chat", json={"input_txt": "你好"})
    assert r.status_code == 200
    assert r.json() == {"response": bot.chat("你好")}


def test_health_and_models(client, server, bot):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == bot.model_name and h["auth"] is False
    models = openai_client(server).models.list()
    assert [m.id for m in models.data] == [bot.model_name]


def test_openai_client_plain_and_streaming(server, bot):
    c = openai_client(server)
    msgs = [{"role": "user", "content": "3加5等于多少？"}]
    r = c.chat.completions.create(model=bot.model_name, messages=msgs)
    expected = bot.chat("3加5等于多少？")
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(bot.build_input_ids("3加5等于多少？"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=bot.model_name, messages=msgs, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # max_tokens is honoured and reported as "length"
    r = c.chat.completions.create(model="any", messages=[{"role": "user", "content": "7千米等于多少米？"}],
                                  max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_sse_wire_format(client):
    body = {"messages": [{"role": "user", "content": "你好"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_multi_turn_and_system_messages(server, bot):
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": [{"type": "text", "text": "你是谁？"}]}]
    r = openai_client(server).chat.completions.create(model="m", messages=msgs)
    assert r.choices[0].message.content == bot.chat("你是谁？", history=[("你好", "你好！")], system="你是助手")
    assert r.usage.prompt_tokens == len(bot.build_input_ids("你是谁？", [("你好", "你好！")], "你是助手"))


def test_sampling_request(server):
    r = openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "你好"}],
                                           temperature=1.2, top_p=0.9)
    assert isinstance(r.choices[0].message.content, str)


def test_16_concurrent_streams_do_not_interleave(server, bot):
    expected = {q: bot.chat(q) for q in PROMPTS}
    assert len(set(expected.values())) >= 8, "the toy model must answer different prompts differently"

    def one(q):
        stream = openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                    stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    with ThreadPoolExecutor(16) as ex:
        got = dict(zip(PROMPTS, ex.map(one, PROMPTS)))
    assert got == expected
    assert wait_for(lambda: get_state(server.app).health()["in_flight"] == 0)


@pytest.mark.parametrize("payload, status, code", [
    (b'{"input_txt": ', 400, "invalid_json"),
    (b'not json at all', 400, "invalid_json"),
    (b'[1, 2]', 422, "invalid_request"),
    (b'{"input": "x"}', 422, "invalid_request"),
    (b'{"input_txt": 5}', 422, "invalid_request"),
    (b'{"input_txt": ""}', 422, "invalid_request"),
])
def test_malformed_reference_bodies(client, payload, status, code):
    r = client.post("/api/chat", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 422, "messages"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400, "limit of 48"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "max_n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}, 400, "at most 4"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 422, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5, "search_type": "beam"}, 400,
     "frequency_penalty"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
    ({"messages": [{"role": "user", "content": "你好" * 200}]}, 400, "max_prompt_tokens"),
    ({"messages": [{"role": "user", "content": "你好" * 200}], "stream": True}, 400, "max_prompt_tokens"),
])
def test_bad_completion_requests_are_clear_4xx(client, body, status, fragment):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_openai_client_sees_4xx_errors(server):
    with pytest.raises(openai.BadRequestError, match="limit of 48"):
        openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=999)


def test_sample_exchange(toy_model_dir):
    text = sample_exchange(str(toy_model_dir), prompt="你好", max_new_tokens=16)
    assert "/api/chat" in text and "/v1/chat/completions" in text
    assert text.count("HTTP 200") == 2


def test_api_demo_script_serves(toy_model_dir, monkeypatch):
    """``python api_demo.py --model_dir=... --api_key=k``: its app, served the way uvicorn.run would."""
    import uvicorn

    import api_demo
    seen = {}

    def fake_run(app, host, port, **kw):  # serve on a free port instead, make one call, return
        seen.update(host=host, port=port)
        with ServerThread(app) as srv:
            seen["health"] = httpx.get(srv.url + "/health").json()
            seen["denied"] = httpx.post(srv.url + "/api/chat", json={"input_txt": "你好"}).status_code
            seen["reply"] = httpx.post(srv.url + "/api/chat", json={"input_txt": "你好"},
                                       headers={"Authorization": "Bearer k"}, timeout=60).json()
    monkeypatch.setattr(uvicorn, "run", fake_run)
    api_demo.main(model_dir=str(toy_model_dir), api_key="k", max_new_tokens=16)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8812  # the reference's address by default
    assert seen["health"]["auth"] is True and seen["denied"] == 401
    assert seen["reply"] == {"response": ChatBot(model_dir=str(toy_model_dir), max_new_tokens=16).chat("你好")}


def test_api_demo_missing_model_folder(tmp_path, capsys):
    import api_demo
    with pytest.raises(SystemExit) as e:
        api_demo.main(model_dir=str(tmp_path / "none"))
    assert e.value.code == 1 and "does not exist" in capsys.readouterr().err
