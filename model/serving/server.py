"""The HTTP API: the reference's ``POST /api/chat``, OpenAI-compatible ``/v1/chat/completions`` and
``/v1/completions``, ``/health``, Prometheus ``/metrics`` and the web chat page at ``/``.

Safe under load:
* greedy and sampling requests decode in one shared batch (``model/serving/batching.py``: a request that arrives while
  others decode joins at the next step; a finished one leaves), at most ``max_concurrency`` requests at once;
  beam and contrastive search (and the ct2 engine) run in ``max_concurrency`` worker threads; never on the event
  loop. At most ``max_queue`` more requests wait; beyond that the answer is 503 with ``Retry-After``;
* each request has its own streamers (one per choice) and cancel event: a client that disconnects stops its
  generation at the next token (a queued request that is dropped never starts);
* bodies over ``max_body_bytes`` get 413, malformed JSON 400, invalid fields 422, a prompt over
  ``max_prompt_tokens``, a ``max_tokens`` over ``max_new_tokens``, ``n`` over ``max_n``, more than 4 ``stop``
  strings and fields this model cannot honour (``tools``, ``response_format``...) 400 naming the field: always a
  JSON error, never a 500;
* a key (``api_key`` or env ``CHATLM_API_KEY``) turns on bearer auth (constant-time comparison); no key, no auth;
* ``cors_origins`` (opt-in) lets the listed browser origins call the API.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from config import EOS_ID, InferConfig
from model.serving.batching import BATCH_SEARCH_TYPES, BatchDecoder
from model.serving.infer import (ChatBot, GenerationCancelled, GenerationResult, PromptTooLong, TokenStreamer,
                                 torch_thread_init)
from model.serving.protocol import (SSE_DONE, APIError, ChatIn, CompletionIn, GenerationIn, GenerationRequest, Reply,
                                    TextCompletionIn, error_body, parse_generation, reject_unsupported, single_prompt,
                                    split_messages, sse)

API_KEY_ENV = "CHATLM_API_KEY"
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"  # the web chat page served at /


# ---------------------------------------------------------------------------------------- errors
def _json_error(status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                headers: Optional[dict] = None, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------ guard
class GuardMiddleware:
    """Auth first (every path but ``/health`` and the page at ``/``), then the body limit, before FastAPI reads
    anything.

    Bodies are read up to ``max_bytes`` (413 beyond, checked on Content-Length and on chunked bodies alike)
    and replayed to the app, so no body can make the server buffer more than the limit, and a client without
    the key learns nothing about its request but 401.
    """

    OPEN_PATHS = ("/health", "/")

    def __init__(self, app, state: "ServerState", max_bytes: int):
        self.app, self.state, self.max_bytes = app, state, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.api_key is not None and scope.get("path") not in self.OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            if not self.state.authorized(headers.get(b"authorization", b"").decode("latin-1")):
                return await _json_error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key",
                                         headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.max_bytes <= 0 or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return await _json_error(400, "invalid Content-Length header")(scope, receive, send)
            if n > self.max_bytes:
                return await self._too_large(scope, receive, send, n)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._too_large(scope, receive, send, total)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, n: int):
        resp = _json_error(413, f"request body of {n}+ bytes is over this server's limit of {self.max_bytes} "
                                f"bytes (max_body_bytes)", code="body_too_large",
                           headers={"Connection": "close"})
        return await resp(scope, receive, send)


@dataclass
class Job:
    """One admitted request: its streamers (one per choice, sharing one cancel event) and its future."""
    future: concurrent.futures.Future
    streamers: list[TokenStreamer]
    t0: float
    ttft: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------- metrics
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# ------------------------------------------------------------------------------------------ state
class ServerState:
    """The shared batch decoder, the worker pool, admission counter and statistics (``/health``, ``/metrics``)."""

    def __init__(self, bot: ChatBot, cfg: InferConfig):
        self.bot, self.cfg = bot, cfg
        init = torch_thread_init(cfg.torch_threads)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrency),
                                                              thread_name_prefix="chatlm-gen", initializer=init)
        self.batcher = BatchDecoder(bot, cfg.max_concurrency, thread_init=init) if (
            cfg.batching and bot.model is not None) else None
        self.lock = threading.Lock()
        self.in_flight = 0  # admitted and not finished: running + queued
        self.running = 0  # in worker threads (the batch decoder counts its own)
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "errors": 0}
        self.tokens = {"prompt": 0, "completion": 0}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.started = time.time()
        self.cancels: set[threading.Event] = set()
        key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV)
        self.api_key = key or None

    def authorized(self, header: str) -> bool:
        """``Authorization: Bearer <key>``, compared in constant time; always true when no key is set."""
        if self.api_key is None:
            return True
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                  self.api_key.encode("utf-8"))

    def batched(self, settings: dict) -> bool:
        """Whether a request with these settings decodes in the shared batch."""
        return self.batcher is not None and settings["search_type"] in BATCH_SEARCH_TYPES

    def admit(self) -> None:
        limit = max(1, self.cfg.max_concurrency) + max(0, self.cfg.max_queue)
        with self.lock:
            self.stats["requests"] += 1
            if self.in_flight >= limit:
                self.stats["rejected"] += 1
                raise APIError(503, f"server busy: {self.in_flight} requests in flight (limit {limit}); "
                                    f"retry later", type_="server_error", code="server_busy",
                               headers={"Retry-After": "1"})
            self.in_flight += 1

    def submit(self, ids: list[int], settings: dict, streamers: list[TokenStreamer], seed: Optional[int] = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> concurrent.futures.Future:
        """Queue one request (one streamer per choice); the future gives one GenerationResult per choice.

        The slot taken by ``admit`` is freed when it ends or is dropped.
        """
        cancel = streamers[0].cancel
        with self.lock:
            self.cancels.add(cancel)

        def work():
            with self.lock:
                self.running += 1
            try:
                out = []
                for st in streamers:
                    if cancel.is_set():
                        raise GenerationCancelled()
                    out.append(self.bot.generate(ids, streamer=st, **settings))
                return out
            finally:
                with self.lock:
                    self.running -= 1

        def done(f: concurrent.futures.Future):
            with self.lock:
                self.in_flight -= 1
                self.cancels.discard(cancel)
                if f.cancelled() or isinstance(f.exception(), GenerationCancelled):
                    self.stats["cancelled"] += 1
                elif f.exception() is not None:
                    self.stats["errors"] += 1
                else:
                    self.stats["completed"] += 1
                    self.tokens["prompt"] += len(ids)
                    self.tokens["completion"] += sum(r.completion_tokens for r in f.result())

        try:
            if self.batched(settings):
                fut = self.batcher.submit(ids, settings, streamers, seed=seed, presence_penalty=presence_penalty,
                                          frequency_penalty=frequency_penalty)
            else:
                fut = self.executor.submit(work)
        except RuntimeError:  # shut down
            with self.lock:
                self.in_flight -= 1
                self.cancels.discard(cancel)
            raise APIError(503, "server is shutting down", type_="server_error", code="shutting_down")
        fut.add_done_callback(done)
        return fut

    def observe(self, job: Job) -> None:
        with self.lock:
            self.latency.observe(time.perf_counter() - job.t0)
            if job.ttft:
                self.ttft.observe(job.ttft[0] - job.t0)

    def health(self) -> dict:
        b = self.batcher.stats() if self.batcher is not None else {"running": 0, "waiting": 0, "batch_rows": 0}
        with self.lock:
            running = self.running + b["running"]
            return {"status": "ok", "model": self.bot.model_name, "engine": self.bot.engine,
                    "device": str(self.bot.model.device) if self.bot.model is not None else self.bot.cfg.device,
                    "batching": self.batcher is not None, "auth": self.api_key is not None,
                    "in_flight": self.in_flight, "running": running, "queued": self.in_flight - running,
                    "batch_rows": b["batch_rows"], "max_concurrency": self.cfg.max_concurrency,
                    "max_queue": self.cfg.max_queue, "max_new_tokens": self.bot.cfg.max_new_tokens,
                    "max_prompt_tokens": self.bot.cfg.max_prompt_tokens,
                    "uptime_s": round(time.time() - self.started, 1), **self.stats}

    def metrics(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        h = self.health()
        b = self.batcher.stats() if self.batcher is not None else {"steps": 0, "row_steps": 0}
        with self.lock:
            lines = ["# HELP chatlm_requests_total Requests that reached admission (rejected ones included).",
                     "# TYPE chatlm_requests_total counter", f"chatlm_requests_total {self.stats['requests']}",
                     "# HELP chatlm_requests_finished_total Requests by how they ended.",
                     "# TYPE chatlm_requests_finished_total counter"]
            lines += [f'chatlm_requests_finished_total{{outcome="{k}"}} {self.stats[k]}'
                      for k in ("completed", "cancelled", "rejected", "errors")]
            lines += ["# HELP chatlm_prompt_tokens_total Prompt tokens of completed requests.",
                      "# TYPE chatlm_prompt_tokens_total counter", f"chatlm_prompt_tokens_total {self.tokens['prompt']}",
                      "# HELP chatlm_generated_tokens_total Generated tokens of completed requests (all choices).",
                      "# TYPE chatlm_generated_tokens_total counter",
                      f"chatlm_generated_tokens_total {self.tokens['completion']}"]
            latency = self.latency.lines("chatlm_request_duration_seconds",
                                         "Time from admission to the last token, completed requests.")
            ttft = self.ttft.lines("chatlm_time_to_first_token_seconds",
                                   "Time from admission to the first streamed text, completed requests.")
        for name, help_, v in (("in_flight", "Admitted requests not finished (running + queued).", h["in_flight"]),
                               ("running_requests", "Requests being decoded.", h["running"]),
                               ("queue_depth", "Admitted requests waiting to start.", h["queued"]),
                               ("batch_rows", "Sequences in the shared decoding batch.", h["batch_rows"])):
            lines += [f"# HELP chatlm_{name} {help_}", f"# TYPE chatlm_{name} gauge", f"chatlm_{name} {v}"]
        lines += ["# HELP chatlm_decode_steps_total Shared batch decoder steps.", "# TYPE chatlm_decode_steps_total counter",
                  f"chatlm_decode_steps_total {b['steps']}",
                  "# HELP chatlm_decode_rows_total Sequences advanced by those steps (sum of batch sizes).",
                  "# TYPE chatlm_decode_rows_total counter", f"chatlm_decode_rows_total {b['row_steps']}"]
        return "\n".join(lines + latency + ttft) + "\n"

    def shutdown(self) -> None:
        with self.lock:
            for c in self.cancels:
                c.set()
        if self.batcher is not None:
            self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Sets ``cancel`` when the client goes away (uvicorn also reports the end of the response this way)."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                cancel.set()
                return
    except Exception:  # the connection is gone one way or another
        cancel.set()


# ------------------------------------------------------------------------------------ error answers
async def _api_error(_req, exc: APIError):
    return _json_error(exc.status, exc.message, exc.type, exc.code, exc.headers, exc.param)


async def _validation_error(_req, exc: RequestValidationError):
    """400 for malformed JSON, 422 naming up to five invalid fields otherwise."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        ctx = e.get("ctx") or {}
        return _json_error(400, f"malformed JSON body: {ctx.get('error', e.get('msg'))}", code="invalid_json")
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    first = ".".join(str(x) for x in errs[0].get("loc", ()) if x != "body") if errs else None
    return _json_error(422, "invalid request: " + "; ".join(parts), code="invalid_request", param=first or None)


async def _http_error(_req, exc: StarletteHTTPException):
    return _json_error(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers)


async def _unexpected_error(_req, exc: Exception):  # last resort: a JSON body, never a bare traceback
    return _json_error(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


ERROR_HANDLERS = ((APIError, _api_error), (RequestValidationError, _validation_error),
                  (StarletteHTTPException, _http_error), (Exception, _unexpected_error))


# ------------------------------------------------------------------------------------- streaming
END_OF_PIECES = object()  # put on a stream's piece queue once its generation ends


async def completion_events(reply: Reply, job: Job, pieces: asyncio.Queue, n: int, include_usage: bool,
                            on_success: Callable[[], None], on_close: Callable[[], None]) -> AsyncIterator[str]:
    """The SSE events of one streamed answer: the chat role openers, each ``(choice, text)`` piece from
    ``pieces`` as it arrives (until ``END_OF_PIECES``), the finish reasons, the usage if asked, ``[DONE]``.

    A generation that fails after the headers are sent is reported in-band; a cancelled one just ends.
    ``on_close`` runs however the stream ends (the client may leave at any event).
    """
    try:
        if reply.chat:
            for i in range(n):
                yield reply.chunk(i, None, role=True)
        while True:
            item = await pieces.get()
            if item is END_OF_PIECES:
                break
            yield reply.chunk(item[0], item[1])
        try:
            results = job.future.result()
        except (GenerationCancelled, concurrent.futures.CancelledError):
            return
        except Exception as e:  # headers are sent: report in-band, then end the stream
            yield sse(error_body(f"generation failed: {e}", "server_error"))
            yield SSE_DONE
            return
        on_success()
        for i, r in enumerate(results):
            yield reply.chunk(i, None, r.finish_reason)
        if include_usage:
            yield reply.usage_chunk(results)
        yield SSE_DONE
    finally:
        on_close()


# ----------------------------------------------------------------------------------- generations
class Generations:
    """Runs parsed requests for the routes: prompt ids, settings checked before admission, one streamer per
    choice, the disconnect watch, and the JSON or streamed answer. One per app, over its ``ServerState``."""

    def __init__(self, state: ServerState):
        self.state, self.bot, self.cfg = state, state.bot, state.cfg
        self.watchers: set[asyncio.Task] = set()

    def prompt_ids(self, query: str, history=None, system=None) -> list[int]:
        try:
            return self.bot.build_input_ids(query, history, system, strict=True)
        except PromptTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages")

    def text_prompt_ids(self, prompt: str) -> list[int]:
        """Raw prompt text (no chat layout) followed by ``[EOS]``, within ``max_prompt_tokens``."""
        ids = self.bot.tokenizer(prompt, add_special_tokens=False)["input_ids"] + [EOS_ID]
        if len(ids) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the limit of "
                                f"{self.cfg.max_prompt_tokens} (max_prompt_tokens); shorten it",
                           code="context_length_exceeded", param="prompt")
        return ids

    def check(self, settings: dict, extra: dict) -> dict:
        """Per-request settings checked before admission (clear 400s)."""
        try:
            settings = self.bot.settings(**settings)
        except ValueError as e:
            raise APIError(400, str(e))
        if not self.state.batched(settings):
            for name in ("presence_penalty", "frequency_penalty"):
                if extra.get(name):
                    raise APIError(400, f"{name} needs greedy or sampling decoding on the torch engine "
                                        f"(this request: {settings['search_type']} on {self.bot.engine}"
                                        f"{', batching off' if not self.cfg.batching else ''})", param=name)
            if extra.get("seed") is not None and settings["search_type"] == "sampling":
                raise APIError(400, "seed needs the batched torch engine (--batching, --engine=torch)", param="seed")
        return settings

    def start(self, request: Request, ids: list[int], gen: GenerationRequest, on_text=None) -> Job:
        """Admit, create the request's streamers (one per choice), queue the generation, watch for disconnects.

        ``on_text(i, piece)`` receives choice ``i``'s text as it is generated (in the decoding thread).
        """
        settings = self.check(gen.settings, gen.extra)
        self.state.admit()
        cancel = threading.Event()
        job = Job(None, [], time.perf_counter())

        def piece_cb(i):
            def cb(piece: str) -> None:
                if not job.ttft:
                    job.ttft.append(time.perf_counter())
                if on_text is not None:
                    on_text(i, piece)
            return cb
        job.streamers = [self.bot.new_streamer(on_text=piece_cb(i), cancel=cancel, stop=gen.stop)
                         for i in range(gen.n)]
        job.future = self.state.submit(ids, settings, job.streamers, **gen.extra)
        task = asyncio.get_running_loop().create_task(_watch_disconnect(request, cancel))
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)
        return job

    def stop(self, job: Job) -> None:
        if not job.future.done():  # the client left (or the server stops): stop generating
            job.streamers[0].cancel.set()
            job.future.cancel()

    async def finish(self, job: Job) -> list[GenerationResult]:
        try:
            out = await asyncio.wrap_future(job.future)
            self.state.observe(job)
            return out
        except GenerationCancelled:
            raise APIError(499, "request cancelled", code="cancelled")
        except ValueError as e:  # settings the engine cannot honour (e.g. contrastive on ct2)
            raise APIError(400, str(e))
        finally:
            self.stop(job)

    async def respond(self, request: Request, body: GenerationIn, ids: list[int], gen: GenerationRequest,
                      chat: bool):
        """The non-streamed JSON answer or the SSE stream, for either completion endpoint."""
        reply = Reply(chat, self.bot.model_name, len(ids))
        if not body.stream:
            return reply.body(await self.finish(self.start(request, ids, gen)))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_text(i: int, piece: str) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(pieces.put_nowait, (i, piece))

        job = self.start(request, ids, gen, on_text=on_text)
        job.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(pieces.put_nowait, END_OF_PIECES))
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = completion_events(reply, job, pieces, gen.n, include_usage,
                                   on_success=lambda: self.state.observe(job), on_close=lambda: self.stop(job))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------- routes
def _generations(request: Request) -> Generations:
    return request.app.state.generations


async def chat_page():
    return FileResponse(CHAT_PAGE, media_type="text/html; charset=utf-8")


async def health(request: Request):
    return _generations(request).state.health()


async def metrics(request: Request):
    return PlainTextResponse(_generations(request).state.metrics(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def api_chat(body: ChatIn, request: Request):
    """The reference's endpoint: ``{"input_txt": ...}`` in, ``{"response": ...}`` out, the config's settings."""
    gens = _generations(request)
    results = await gens.finish(gens.start(request, gens.prompt_ids(body.input_txt), GenerationRequest({}, {})))
    return {"response": results[0].text}


async def models(request: Request):
    return {"object": "list", "data": [{"id": _generations(request).bot.model_name, "object": "model",
                                        "created": 0, "owned_by": "chatlm-mini-chinese"}]}


async def chat_completions(body: CompletionIn, request: Request):
    reject_unsupported(body, ("tools", "tool_choice", "functions", "function_call", "response_format",
                              "top_logprobs"))
    gens = _generations(request)
    gen = parse_generation(body, body.max_completion_tokens or body.max_tokens, gens.cfg)
    system, history, query = split_messages(body.messages)
    return await gens.respond(request, body, gens.prompt_ids(query, history, system), gen, chat=True)


async def completions(body: TextCompletionIn, request: Request):
    prompt = single_prompt(body)
    gens = _generations(request)
    gen = parse_generation(body, body.max_tokens, gens.cfg)
    return await gens.respond(request, body, gens.text_prompt_ids(prompt), gen, chat=False)


ROUTES = (("GET", "/", chat_page), ("GET", "/health", health), ("GET", "/metrics", metrics),
          ("POST", "/api/chat", api_chat), ("GET", "/v1/models", models),
          ("POST", "/v1/chat/completions", chat_completions), ("POST", "/v1/completions", completions))


# ------------------------------------------------------------------------------------------- app
@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.chat.shutdown()


def create_app(bot: ChatBot, cfg: Optional[InferConfig] = None):
    """The ASGI app around one loaded ``ChatBot`` (its config gives the limits unless ``cfg`` is given)."""
    cfg = cfg or bot.cfg
    state = ServerState(bot, cfg)
    app = FastAPI(title="ChatLM-mini-Chinese API", lifespan=_lifespan)
    app.state.chat = state
    app.state.generations = Generations(state)
    for exc_class, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=path != "/")
    return _guarded(app, state, cfg)


def _guarded(app: FastAPI, state: ServerState, cfg: InferConfig):
    """The guard (auth, body limit) around the app, and CORS outermost when origins are listed, so preflights
    and error answers carry the CORS headers too."""
    app = GuardMiddleware(app, state, cfg.max_body_bytes)
    origins = _origins(cfg.cors_origins)
    if origins:
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def _origins(value) -> list[str]:
    """``--cors_origins`` as a list: a comma-separated string or a list (fire may give a tuple)."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip().rstrip("/") for x in items if str(x).strip()]


def get_state(app) -> ServerState:
    """The ServerState of an app made by ``create_app`` (through its guard and CORS layers)."""
    inner = app
    while not isinstance(inner, FastAPI):
        inner = inner.app
    return inner.state.chat


# ------------------------------------------------------------------------------------------ running
def serve(cfg: InferConfig) -> None:
    """Load the model and serve until Ctrl-C (``python api_demo.py``)."""
    bot = ChatBot(cfg)
    app = create_app(bot)
    auth = "on" if get_state(app).api_key else "off (set --api_key or CHATLM_API_KEY to require a key)"
    mode = "batched" if get_state(app).batcher is not None else "one request per thread"
    print(f"serving {bot.model_name} ({bot.engine}, {mode}) on http://{cfg.host}:{cfg.port}  auth: {auth}\n"
          f"chat page: http://{cfg.host}:{cfg.port}/", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)


class ServerThread:
    """Run an app with uvicorn in a background thread on a free port (tests, benchmarks, the demo)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = None
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=2,
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self._sock.close()


def sse_events(response) -> Iterator[dict]:
    """The JSON events of a streamed answer (an httpx streaming response), up to ``data: [DONE]``."""
    for line in response.iter_lines():
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[6:])


def sample_exchange(model_dir: str, prompt: str = "你好", max_new_tokens: int = 64, **overrides) -> str:
    """Start the server on a free port, make one /api/chat and one /v1/chat/completions call, return the log.

    What ``make demo`` prints to show the API; takes a few seconds.
    """
    bot = ChatBot(model_dir=model_dir, max_new_tokens=max_new_tokens, **overrides)
    lines = []
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        calls = [("/api/chat", {"input_txt": prompt}),
                 ("/v1/chat/completions", {"model": bot.model_name, "max_tokens": max_new_tokens,
                                           "messages": [{"role": "user", "content": prompt}]})]
        for path, payload in calls:
            data = json.dumps(payload, ensure_ascii=False)
            t0 = time.perf_counter()
            r = client.post(path, json=payload)
            ms = (time.perf_counter() - t0) * 1000
            lines.append(f"$ curl -s {srv.url}{path} -H 'Content-Type: application/json' -d '{data}'")
            lines.append(f"{json.dumps(r.json(), ensure_ascii=False)}    # HTTP {r.status_code}, {ms:.0f} ms")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m model.serving.server --model_dir=model_save/demo: one sample exchange
    import fire
    fire.Fire(lambda model_dir="model_save/demo", prompt="你好", max_new_tokens=64: print(
        sample_exchange(model_dir, prompt=prompt, max_new_tokens=max_new_tokens)))
