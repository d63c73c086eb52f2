"""Continuous batching (model/serving/batching.py): concurrent requests share decoder steps, and every greedy answer is
the one the same request gets alone (token ids compared exactly), through the decoder and through the server."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import LogitsProcessor

from model.serving.batching import BatchDecoder
from model.serving.infer import ChatBot, GenerationCancelled
from model.serving.server import ServerThread, create_app, get_state, sse_events
from helpers import wait_for

PROMPTS = ["你好", "3加5等于多少？", "星期四的后一天是星期几？", "7千米等于多少米？", "怎样保持健康？",
           "十二加九等于多少？", "六月的上一个月是几月？", "你是谁？"]
LENGTHS = [5, 40, 17, 60, 3, 33, 1, 25]  # max_new_tokens per request: rows leave at different steps


def float64(bot: ChatBot) -> ChatBot:
    """Batched and single decoding sum the same terms in different orders (other matrix shapes); in float32 a
    near tie between the two likeliest tokens could then flip on another CPU. In float64 the round-off (~1e-16
    relative) is far below any gap between logits, so exact equality of the ids is a fair demand anywhere."""
    bot.model.double()
    return bot


@pytest.fixture(scope="module")
def rand_bot(tiny_model_dir):
    """The random tiny model never emits [EOS]: each answer runs to its own max_new_tokens."""
    return float64(ChatBot(model_dir=str(tiny_model_dir), max_new_tokens=64, max_concurrency=8))


def submit_staggered(dec: BatchDecoder, bot: ChatBot, jobs, seed=0, **extra):
    """Submit (prompt, settings) jobs with random small gaps, so they join a batch already decoding."""
    rng = random.Random(seed)
    futs = []
    for q, s in jobs:
        futs.append(dec.submit(bot.build_input_ids(q), bot.settings(**s), [bot.new_streamer(lambda _p: None)],
                               **extra))
        time.sleep(rng.random() * 0.03)
    return [f.result(timeout=120)[0] for f in futs]


def test_batched_greedy_ids_equal_each_request_alone(rand_bot, toy_model_dir):
    for bot in (rand_bot, float64(ChatBot(model_dir=str(toy_model_dir), max_new_tokens=64))):
        jobs = [(q, {"max_new_tokens": n}) for q, n in zip(PROMPTS, LENGTHS)]
        alone = [bot.generate(bot.build_input_ids(q), **s) for q, s in jobs]
        dec = BatchDecoder(bot, max_requests=8)
        try:
            got = submit_staggered(dec, bot, jobs)
            stats = dec.stats()
        finally:
            dec.close()
        for q, a, g in zip(PROMPTS, alone, got):
            assert g.ids == a.ids, q
            assert (g.text, g.finish_reason, g.prompt_tokens) == (a.text, a.finish_reason, a.prompt_tokens)
        if bot is rand_bot:  # the rows really shared steps
            assert stats["row_steps"] >= 1.5 * stats["steps"], stats
            assert [len(a.ids) for a in alone] == LENGTHS


def test_batched_penalty_settings_are_per_row(rand_bot):
    """Rows with different repetition penalties / n-gram sizes in one batch: each equals its run alone."""
    settings = [{"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}, {"repetition_penalty": 1.3},
                {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 1, "max_new_tokens": 20}, {}]
    jobs = [(q, dict(s, max_new_tokens=s.get("max_new_tokens", 30))) for q, s in zip(PROMPTS, settings)]
    alone = [rand_bot.generate(rand_bot.build_input_ids(q), **s).ids for q, s in jobs]
    assert len({tuple(a) for a in alone}) == len(alone)
    dec = BatchDecoder(rand_bot, max_requests=8)
    try:
        got = [r.ids for r in submit_staggered(dec, rand_bot, jobs, seed=1)]
    finally:
        dec.close()
    assert got == alone


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the generated tokens (the reference for the batched rows)."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids, scores):
        for r in range(scores.shape[0]):
            gen = input_ids[r, 1:]  # the decoder start token is not generated
            if gen.numel():
                toks, counts = gen.unique(return_counts=True)
                scores[r, toks] -= counts.to(scores.dtype) * self.frequency + self.presence
        return scores


def test_presence_and_frequency_penalties_match_a_reference_processor(rand_bot):
    bot = rand_bot
    q = "怎样保持健康？"
    ids = bot.build_input_ids(q)
    s = bot.settings(max_new_tokens=24)
    x = torch.tensor([ids])
    cfg = bot.model.generation_kwargs("greedy", 24, repetition_penalty=s["repetition_penalty"],
                                      no_repeat_ngram_size=s["no_repeat_ngram_size"])
    dec = BatchDecoder(bot, max_requests=4)
    try:
        for pres, freq in ((0.8, 0.0), (0.0, 1.5), (-0.5, 0.7)):
            ref = bot.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                     logits_processor=[OpenAIPenalties(pres, freq)])[0, 1:].tolist()
            other = dec.submit(bot.build_input_ids("你好"), s, [bot.new_streamer(lambda _p: None)])  # a neighbour row
            got = dec.submit(ids, s, [bot.new_streamer(lambda _p: None)], presence_penalty=pres,
                             frequency_penalty=freq).result(timeout=60)[0].ids
            other.result(timeout=60)
            assert got == ref, (pres, freq)
    finally:
        dec.close()
    plain = bot.generate(ids, max_new_tokens=24).ids
    assert plain != ref  # the penalties changed the answer


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(rand_bot):
    s = {"search_type": "sampling", "max_new_tokens": 20, "temperature": 1.0}
    dec = BatchDecoder(rand_bot, max_requests=8)
    try:
        alone = dec.submit(rand_bot.build_input_ids("你好"), rand_bot.settings(**s),
                           [rand_bot.new_streamer(lambda _p: None)], seed=7).result(timeout=60)[0].ids
        futs = [dec.submit(rand_bot.build_input_ids(q), rand_bot.settings(**s), [rand_bot.new_streamer(lambda _p: None)],
                           seed=7 if q == "你好" else 100 + i) for i, q in enumerate(PROMPTS[:5])]
        batched = [f.result(timeout=60)[0].ids for f in futs]
        other_seed = dec.submit(rand_bot.build_input_ids("你好"), rand_bot.settings(**s),
                                [rand_bot.new_streamer(lambda _p: None)], seed=8).result(timeout=60)[0].ids
    finally:
        dec.close()
    assert batched[0] == alone
    assert other_seed != alone


def test_cancelled_row_leaves_and_the_others_finish(rand_bot):
    dec = BatchDecoder(rand_bot, max_requests=4)
    try:
        cancel = threading.Event()
        long = dec.submit(rand_bot.build_input_ids("你好"), rand_bot.settings(max_new_tokens=64),
                          [rand_bot.new_streamer(lambda _p: None, cancel=cancel)])
        short = dec.submit(rand_bot.build_input_ids("你是谁？"), rand_bot.settings(max_new_tokens=30),
                           [rand_bot.new_streamer(lambda _p: None)])
        assert wait_for(lambda: dec.stats()["batch_rows"] == 2)
        cancel.set()
        with pytest.raises(GenerationCancelled):
            long.result(timeout=30)
        assert short.result(timeout=60)[0].ids == rand_bot.generate(rand_bot.build_input_ids("你是谁？"),
                                                                    max_new_tokens=30).ids
        assert wait_for(lambda: dec.stats()["running"] == 0 and dec.stats()["batch_rows"] == 0)
    finally:
        dec.close()


# ---------------------------------------------------------------------------------- through the server
def _post(client, q, n, stream):
    body = {"messages": [{"role": "user", "content": q}], "max_tokens": n, "stream": stream,
            "stream_options": {"include_usage": True}}
    if not stream:
        r = client.post("/v1/chat/completions", json=body).json()
        return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]
    text, used = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for ev in sse_events(r):
            used = ev["usage"]["completion_tokens"] if ev.get("usage") else used
            text += "".join(c["delta"].get("content") or "" for c in ev["choices"])
    return text, used


def test_server_concurrent_requests_equal_single_answers(rand_bot, toy_model_dir):
    """Streamed and plain requests of different lengths, all at once, through HTTP: each answer (text and
    token count) equals ChatBot's answer to that request alone."""
    toy = float64(ChatBot(model_dir=str(toy_model_dir), max_new_tokens=64, max_concurrency=16))
    for bot in (rand_bot, toy):
        expected = [bot.generate(bot.build_input_ids(q), max_new_tokens=n) for q, n in zip(PROMPTS, LENGTHS)]
        app = create_app(bot)
        with ServerThread(app) as srv:
            def one(i):
                time.sleep(0.01 * i)
                with httpx.Client(base_url=srv.url, timeout=60) as c:
                    return _post(c, PROMPTS[i], LENGTHS[i], stream=i % 2 == 0)
            with ThreadPoolExecutor(len(PROMPTS)) as ex:
                got = list(ex.map(one, range(len(PROMPTS))))
            state = get_state(app)
            assert wait_for(lambda: state.health()["in_flight"] == 0)
            steps = state.batcher.stats()
        assert got == [(e.text, e.completion_tokens) for e in expected]
        assert steps["row_steps"] > steps["steps"]  # requests shared steps


def test_server_disconnect_frees_the_slot_and_the_batch_goes_on(rand_bot, tiny_model_dir):
    bot = ChatBot(model_dir=str(tiny_model_dir), max_new_tokens=3000, max_concurrency=2, max_queue=0)
    app = create_app(bot)
    state = get_state(app)
    body = {"messages": [{"role": "user", "content": "你好"}], "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c1, \
            httpx.Client(base_url=srv.url, timeout=60) as c2:
        with c1.stream("POST", "/v1/chat/completions", json=body) as r1:
            lines = r1.iter_lines()
            assert next(lines).startswith("data: ")
            assert wait_for(lambda: state.health()["running"] == 1)
            expected = rand_bot.generate(rand_bot.build_input_ids("你是谁？"), max_new_tokens=40)
            text, used = _post(c2, "你是谁？", 40, stream=False)  # decoded beside the endless stream
            assert (text, used) == (expected.text, expected.completion_tokens)
            # both slots taken: a third request is refused
            with c2.stream("POST", "/v1/chat/completions", json=body) as r2:
                assert r2.status_code == 200
                assert wait_for(lambda: state.health()["running"] == 2)
                assert c2.post("/api/chat", json={"input_txt": "你好"}).status_code == 503
        # both endless streams closed by their clients mid-generation: slots freed, rows gone
        assert wait_for(lambda: state.health()["in_flight"] == 0, timeout=15), state.health()
        assert wait_for(lambda: state.batcher.stats()["batch_rows"] == 0)
        h = state.health()
        assert h["cancelled"] == 2 and h["completed"] == 1 and h["rejected"] == 1
