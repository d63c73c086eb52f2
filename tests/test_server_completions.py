"""The server's OpenAI-style options and endpoints: stop, n, seed, /v1/completions, /health, /metrics, CORS,
fields the model cannot honour (400 naming the field). Real HTTP (uvicorn on a free port), httpx and openai."""
from __future__ import annotations

import re

import httpx
import openai
import pytest
from helpers import openai_client, sse

from config import EOS_ID
from model.serving.infer import ChatBot
from model.serving.server import ServerThread, create_app, get_state

Q = "3加5等于多少？"


@pytest.fixture(scope="module")
def bot(toy_model_dir):
    return ChatBot(model_dir=str(toy_model_dir), max_new_tokens=48, max_prompt_tokens=64, max_n=3)


@pytest.mark.parametrize("search_type", ["greedy", "beam"])  # the batched path and the worker-thread path
def test_stop_cuts_before_the_stop_string_stream_and_not(server, client, bot, search_type):
    full = bot.chat(Q, search_type=search_type)
    assert len(full) >= 4
    stop = full[2:4]  # two characters: two tokens of the char tokenizer, so the match spans tokens
    cut = full[:full.index(stop)]
    r = openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], stop=[stop, "不会出现"],
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


def test_n_choices_greedy_and_seeded_sampling(server, client, bot):
    r = openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": Q}], n=3)
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


def test_text_completions_plain_stream_and_openai_client(server, client, bot):
    prompt = "7千米等于多少米？"
    ids = bot.tokenizer(prompt, add_special_tokens=False)["input_ids"] + [EOS_ID]
    expected = bot.generate(ids)
    r = openai_client(server).completions.create(model="m", prompt=prompt, max_tokens=48)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == expected.completion_tokens
    stream = openai_client(server).completions.create(model="m", prompt=prompt, stream=True)
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


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 1}),
    ("functions", [{"name": "f"}]),
])
def test_fields_the_model_cannot_honour_are_a_clear_400(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
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
