"""The server's OpenAI-style options and endpoints: stop, n, seed, /v1/completions, /health, /metrics, CORS,
fields the model cannot honour (400 naming the field). Real HTTP (uvicorn on a free port), httpx and openai."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from config import EOS_ID, InferConfig, make_config
from model.serving.infer import ChatBot
from model.serving.server import ServerThread, create_app, get_state
from test_api import client, oa, server  # noqa: F401  (fixtures: the server around this module's bot)

Q = "3加5等于多少？"


@pytest.fixture(scope="module")
def bot(toy_model_dir):
    return ChatBot(model_dir=str(toy_model_dir), max_new_tokens=48, max_prompt_tokens=64, max_n=3)


def sse(client, path, body) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# -------------------------------------------------------------------------------------------- stop
@pytest.mark.parametrize("search_type", ["greedy", "beam"])  # the batched path and the worker-thread path
def test_stop_cuts_before_the_stop_string_stream_and_not(server, client, bot, search_type):
    full = bot.chat(Q, search_type=search_type)
    assert len(full) >= 4
    stop = full[2:4]  # two characters: two tokens of the char tokenizer, so the match spans tokens
    cut = full[:full.index(stop)]
    r = oa(server).chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], stop=[stop, "不会出现"],
                                           extra_body={"search_type": search_type})
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(bot.tokenizer(full, add_special_tokens=False)["input_ids"]) + 1
    events = sse(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": Q}], "stop": stop,
                                                   "search_type": search_type})
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # a stop string that never appears changes nothing
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "stop": "§",
                                                  "search_type": search_type}).json()
    assert r["choices"][0]["message"]["content"] == full


# ----------------------------------------------------------------------------------------------- n
def test_n_choices_greedy_and_seeded_sampling(server, client, bot):
    r = oa(server).chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {bot.chat(Q)}
    one = r.usage.completion_tokens // 3
    assert r.usage.completion_tokens == 3 * one
    body = {"messages": [{"role": "user", "content": Q}], "n": 2, "temperature": 1.5, "seed": 11}
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]]  # same seed, same choices
    events = sse(client, "/v1/chat/completions", body)  # streamed choices interleave, keyed by index
    streamed = ["", ""]
    for e in events:
        for ch in e["choices"]:
            streamed[ch["index"]] += ch["delta"].get("content") or ""
    assert streamed == texts
    assert sorted(ch["index"] for e in events for ch in e["choices"] if ch["finish_reason"]) == [0, 1]


def test_seed_gives_reproducible_samples(client):
    body = {"messages": [{"role": "user", "content": "你是谁？"}], "temperature": 1.8, "top_p": 1.0}
    outs = {s: [client.post("/v1/chat/completions", json={**body, "seed": s}).json()["choices"][0]["message"]["content"]
                for _ in range(2)] for s in (1, 2, 3, 4)}
    assert all(a == b for a, b in outs.values())
    assert len({v[0] for v in outs.values()}) > 1


# ------------------------------------------------------------------------------------ /v1/completions
def test_text_completions_plain_stream_and_openai_client(server, client, bot):
    prompt = "7千米等于多少米？"
    ids = bot.tokenizer(prompt, add_special_tokens=False)["input_ids"] + [EOS_ID]
    expected = bot.generate(ids)
    r = oa(server).completions.create(model="m", prompt=prompt, max_tokens=48)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == expected.completion_tokens
    stream = oa(server).completions.create(model="m", prompt=prompt, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text
    events = sse(client, "/v1/completions", {"prompt": [prompt], "stream_options": {"include_usage": True}})
    assert events[-1]["usage"]["completion_tokens"] == expected.completion_tokens
    assert events[-2]["choices"][0]["finish_reason"] == expected.finish_reason
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": ["a", "b"]}, 400, "one string"),
    ({"prompt": " "}, 400, "empty"),
    ({"prompt": "你好" * 100}, 400, "max_prompt_tokens"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "n": 4}, 400, "max_n"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({}, 422, "prompt"),
])
def test_bad_text_completion_requests(client, body, status, fragment):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


# --------------------------------------------------------------------------------- unsupported fields
@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 1}),
    ("functions", [{"name": "f"}]),
])
def test_fields_the_model_cannot_honour_are_a_clear_400(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        oa(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_plain_text_response_format_is_accepted(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "你好"}],
                                                  "response_format": {"type": "text"}, "max_tokens": 4})
    assert r.status_code == 200


def test_penalties_are_rejected_where_they_cannot_apply(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=8, batching=False)
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        msgs = [{"role": "user", "content": "你好"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "presence_penalty": 0.5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"
        assert "batching off" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": msgs, "stop": "。", "n": 2}).status_code == 200
        assert get_state(srv.app).health()["batching"] is False


# ------------------------------------------------------------------------------------ health, metrics
def test_health_reports_model_and_queue(client, bot):
    h = client.get("/health").json()
    for k in ("model", "engine", "device", "batching", "in_flight", "running", "queued", "batch_rows",
              "max_concurrency", "max_queue", "max_new_tokens", "completed", "rejected"):
        assert k in h, k
    assert h["model"] == bot.model_name and h["batching"] is True and h["max_new_tokens"] == 48


def test_metrics_prometheus_exposition(client):
    def scrape() -> dict:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out = {}
        for line in r.text.splitlines():
            if line.startswith("#"):
                assert re.match(r"# (HELP|TYPE) chatlm_\w+ ", line), line
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        return out
    before = scrape()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "你好"}]}).json()
    sse(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 5})
    after = scrape()
    assert after["chatlm_requests_total"] == before["chatlm_requests_total"] + 2
    assert after['chatlm_requests_finished_total{outcome="completed"}'] == \
        before['chatlm_requests_finished_total{outcome="completed"}'] + 2
    assert after["chatlm_generated_tokens_total"] >= before["chatlm_generated_tokens_total"] + \
        r["usage"]["completion_tokens"] + 1
    assert after["chatlm_request_duration_seconds_count"] == before["chatlm_request_duration_seconds_count"] + 2
    assert after['chatlm_request_duration_seconds_bucket{le="+Inf"}'] == after["chatlm_request_duration_seconds_count"]
    assert after["chatlm_time_to_first_token_seconds_count"] >= before["chatlm_time_to_first_token_seconds_count"] + 1
    for g in ("chatlm_in_flight", "chatlm_queue_depth", "chatlm_running_requests", "chatlm_batch_rows"):
        assert after[g] == 0
    assert after["chatlm_decode_rows_total"] > before["chatlm_decode_rows_total"]


# ---------------------------------------------------------------------------------------------- CORS
def test_cors_is_off_by_default(client):
    r = client.options("/v1/chat/completions", headers={"Origin": "http://a.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allow_list_with_auth(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=8, api_key="k",
                  cors_origins="http://a.example, http://b.example/")
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/chat/completions", headers={"Origin": "http://b.example", **pre})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://b.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        body = {"messages": [{"role": "user", "content": "你好"}]}
        r = c.post("/v1/chat/completions", json=body, headers={"Origin": "http://a.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://a.example"
        r = c.post("/v1/chat/completions", json=body, headers={"Origin": "http://a.example",
                                                              "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://a.example"
        assert get_state(srv.app).api_key == "k"  # get_state reaches through the CORS layer


def test_cors_origins_flag_forms():
    assert make_config(InferConfig, cors_origins="*").cors_origins == "*"
    assert make_config(InferConfig, cors_origins=("http://a", "http://b")).cors_origins == ("http://a", "http://b")
    from model.serving.server import _origins
    assert _origins("http://a, http://b/") == ["http://a", "http://b"]
    assert _origins(("http://a",)) == ["http://a"] and _origins(None) == []
