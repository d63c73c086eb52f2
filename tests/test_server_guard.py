"""What stands before a request reaches the model: bearer auth, the body size limit, JSON errors for unknown
paths, CORS, and admission (503 when the queue is full; a disconnect frees the slot)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers import openai_client, wait_for

from config import InferConfig, make_config
from model.serving.infer import ChatBot
from model.serving.server import ServerThread, _origins, create_app, get_state


@pytest.fixture(scope="module")
def bot(toy_model_dir):
    return ChatBot(model_dir=str(toy_model_dir), max_new_tokens=16, max_body_bytes=4096)


def test_oversize_bodies_get_413(client):
    big = json.dumps({"input_txt": "好" * 5000}).encode()
    r = client.post("/api/chat", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the server must count while reading
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]
    r = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200  # still serving


def test_unknown_path_is_json_404(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_auth_on_with_key_in_config(toy_model_dir):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=16, api_key="s3cret")
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.post("/api/chat", json={"input_txt": "你好"}).status_code == 401
        r = c.post("/api/chat", json={"input_txt": "你好"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        # no body is parsed before the key is checked
        assert c.post("/api/chat", content=b"{bad", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200
        ok = c.post("/api/chat", json={"input_txt": "你好"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == {"response": bot.chat("你好")}
        with pytest.raises(openai.AuthenticationError):
            openai_client(srv, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        r = openai_client(srv, "s3cret").chat.completions.create(model="m", messages=[{"role": "user", "content": "你好"}])
        assert r.choices[0].message.content == bot.chat("你好")


def test_auth_key_from_environment(toy_model_dir, monkeypatch):
    monkeypatch.setenv("CHATLM_API_KEY", "envkey")
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=8)
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer envkey"}).status_code == 200


def test_no_key_means_no_auth(client):
    assert client.get("/v1/models").status_code == 200  # no header at all
    assert client.get("/v1/models", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_queue_full_503_and_disconnect_cancels(tiny_model_dir):
    """One worker, one queue slot: the third request is refused; dropping the streams stops generation.

    The random tiny model never emits [EOS], so each of these requests would run all 3,000 tokens
    (tens of seconds) unless its cancellation works.
    """
    bot = ChatBot(model_dir=str(tiny_model_dir), max_new_tokens=3000, max_concurrency=1, max_queue=1)
    app = create_app(bot)
    state = get_state(app)
    body = {"messages": [{"role": "user", "content": "你好"}], "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c1, \
            httpx.Client(base_url=srv.url, timeout=30) as c2, httpx.Client(base_url=srv.url, timeout=30) as c3:
        with c1.stream("POST", "/v1/chat/completions", json=body) as r1:
            assert r1.status_code == 200
            lines1 = r1.iter_lines()  # keep it: dropping a half-read iterator closes the connection
            assert next(lines1).startswith("data: ")  # running
            assert wait_for(lambda: state.health()["running"] == 1)
            with c2.stream("POST", "/v1/chat/completions", json=body) as r2:
                assert r2.status_code == 200  # admitted, waiting for the worker
                r3 = c3.post("/api/chat", json={"input_txt": "你好"})
                assert r3.status_code == 503 and r3.headers["retry-after"] == "1"
                assert r3.json()["error"]["code"] == "server_busy"
        # both streams closed by the client mid-generation
        assert wait_for(lambda: state.health()["in_flight"] == 0, timeout=15), state.health()
        h = state.health()
        assert h["cancelled"] == 2 and h["completed"] == 0 and h["rejected"] == 1
        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            c3.post("/api/chat", json={"input_txt": "你好"}, timeout=0.5)
        assert wait_for(lambda: state.health()["cancelled"] == 3, timeout=15), state.health()
        assert state.health()["in_flight"] == 0


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
    assert _origins("http://a, http://b/") == ["http://a", "http://b"]
    assert _origins(("http://a",)) == ["http://a"] and _origins(None) == []
