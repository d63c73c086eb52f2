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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from config import EOS_ID, InferConfig
from model.serving.batching import BATCH_SEARCH_TYPES, BatchDecoder
from model.serving.infer import (ChatBot, GenerationCancelled, GenerationResult, PromptTooLong, TokenStreamer,
                                 torch_thread_init)

API_KEY_ENV = "CHATLM_API_KEY"
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"  # the web chat page served at /


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers, self.param = (
            status, message, type_, code, headers, param)


def error_body(message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    """OpenAI's error shape, so OpenAI clients raise a readable exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


# ------------------------------------------------------------------------------------ request models
class ChatIn(BaseModel):
    """The reference's request: ``{"input_txt": "..."}``."""
    model_config = ConfigDict(extra="ignore")
    input_txt: str = Field(min_length=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise APIError(400, f"content part of type {p.type!r} is not supported (text only)",
                               param="messages")
            parts.append(p.text)
        return "".join(parts)


class GenerationIn(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logprobs: Any = None
    logit_bias: Optional[dict[str, Any]] = None
    # extensions (not in OpenAI's API)
    search_type: Optional[Literal["greedy", "beam", "sampling", "contrastive"]] = None
    top_k: Optional[int] = Field(None, ge=1, le=1000)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)


class CompletionIn(GenerationIn):
    """``POST /v1/chat/completions``."""
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    top_logprobs: Optional[int] = None


class TextCompletionIn(GenerationIn):
    """``POST /v1/completions``: raw prompt text in, text out (no chat layout)."""
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


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


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _reject_unsupported(body: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(body, name, None)
        if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
            continue  # the default: plain text
        if v not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported by this server (a plain text chat model); "
                                f"remove the field", param=name, code="unsupported_parameter")


# ------------------------------------------------------------------------------------------- app
def create_app(bot: ChatBot, cfg: Optional[InferConfig] = None):
    """The ASGI app around one loaded ``ChatBot`` (its config gives the limits unless ``cfg`` is given)."""
    cfg = cfg or bot.cfg
    state = ServerState(bot, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.shutdown()

    app = FastAPI(title="ChatLM-mini-Chinese API", lifespan=lifespan)
    app.state.chat = state
    watchers: set[asyncio.Task] = set()

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return _json_error(exc.status, exc.message, exc.type, exc.code, exc.headers, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        return _json_error(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_req, exc: Exception):  # last resort: a JSON body, never a bare traceback
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    def prompt_ids(query: str, history=None, system=None) -> list[int]:
        try:
            return bot.build_input_ids(query, history, system, strict=True)
        except PromptTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages")

    def check(settings: dict, extra: dict) -> dict:
        """Per-request settings checked before admission (clear 400s)."""
        try:
            settings = bot.settings(**settings)
        except ValueError as e:
            raise APIError(400, str(e))
        if not state.batched(settings):
            for name in ("presence_penalty", "frequency_penalty"):
                if extra.get(name):
                    raise APIError(400, f"{name} needs greedy or sampling decoding on the torch engine "
                                        f"(this request: {settings['search_type']} on {bot.engine}"
                                        f"{', batching off' if not cfg.batching else ''})", param=name)
            if extra.get("seed") is not None and settings["search_type"] == "sampling":
                raise APIError(400, "seed needs the batched torch engine (--batching, --engine=torch)", param="seed")
        return settings

    def start(request: Request, ids: list[int], settings: dict, n: int = 1, stop=(), on_text=None,
              extra: Optional[dict] = None) -> Job:
        """Admit, create the request's streamers (one per choice), queue the generation, watch for disconnects.

        ``on_text(i, piece)`` receives choice ``i``'s text as it is generated (in the decoding thread).
        """
        extra = extra or {}
        settings = check(settings, extra)
        state.admit()
        cancel = threading.Event()
        job = Job(None, [], time.perf_counter())

        def piece_cb(i):
            def cb(piece: str) -> None:
                if not job.ttft:
                    job.ttft.append(time.perf_counter())
                if on_text is not None:
                    on_text(i, piece)
            return cb
        job.streamers = [bot.new_streamer(on_text=piece_cb(i), cancel=cancel, stop=stop) for i in range(n)]
        job.future = state.submit(ids, settings, job.streamers, **extra)
        task = asyncio.get_running_loop().create_task(_watch_disconnect(request, cancel))
        watchers.add(task)
        task.add_done_callback(watchers.discard)
        return job

    def stop_job(job: Job) -> None:
        if not job.future.done():  # the client left (or the server stops): stop generating
            job.streamers[0].cancel.set()
            job.future.cancel()

    async def finish(job: Job) -> list[GenerationResult]:
        try:
            out = await asyncio.wrap_future(job.future)
            state.observe(job)
            return out
        except GenerationCancelled:
            raise APIError(499, "request cancelled", code="cancelled")
        except ValueError as e:  # settings the engine cannot honour (e.g. contrastive on ct2)
            raise APIError(400, str(e))
        finally:
            stop_job(job)

    def common(body: GenerationIn, max_new: Optional[int]) -> tuple[dict, dict, int, list[str]]:
        """(settings, extra, n, stop) from the fields both completion endpoints share."""
        _reject_unsupported(body, ("logit_bias", "logprobs"))
        n = body.n or 1
        if n > cfg.max_n:
            raise APIError(400, f"n={n} is over this server's limit of {cfg.max_n} choices (max_n)", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stop)}", param="stop")
        if any(not x for x in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if max_new is not None and max_new > cfg.max_new_tokens:
            raise APIError(400, f"max_tokens {max_new} is over this server's limit of {cfg.max_new_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        settings: dict[str, Any] = {"max_new_tokens": max_new, "top_k": body.top_k, "top_p": body.top_p,
                                    "repetition_penalty": body.repetition_penalty}
        if body.search_type is not None:
            settings["search_type"] = body.search_type
            if body.temperature:
                settings["temperature"] = body.temperature
        elif body.temperature is not None:
            if body.temperature == 0:
                settings["search_type"] = "greedy"
            else:
                settings.update(search_type="sampling", temperature=body.temperature)
        extra = {"seed": body.seed, "presence_penalty": body.presence_penalty or 0.0,
                 "frequency_penalty": body.frequency_penalty or 0.0}
        return settings, extra, n, stop

    async def respond(request: Request, body: GenerationIn, ids: list[int], settings: dict, extra: dict, n: int,
                      stop: list[str], chat: bool):
        """The non-streamed JSON answer or the SSE stream, for either completion endpoint."""
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": bot.model_name}
        obj = "chat.completion" if chat else "text_completion"

        def usage(results) -> dict:
            c = sum(r.completion_tokens for r in results)
            return {"prompt_tokens": len(ids), "completion_tokens": c, "total_tokens": len(ids) + c}

        if not body.stream:
            results = await finish(start(request, ids, settings, n, stop, extra=extra))
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                            "finish_reason": r.finish_reason} for i, r in enumerate(results)]
            else:
                choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                           for i, r in enumerate(results)]
            return {**head, "object": obj, "choices": choices, "usage": usage(results)}

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        end = object()

        def on_text(i: int, piece: str) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(pieces.put_nowait, (i, piece))

        job = start(request, ids, settings, n, stop, on_text=on_text, extra=extra)
        job.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(pieces.put_nowait, end))
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(i: int, text: Optional[str], finish_reason=None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return _sse({**head, "object": "text_completion", "choices": [choice]})

        async def events():
            try:
                if chat:
                    for i in range(n):
                        yield chunk(i, None, role=True)
                while True:
                    item = await pieces.get()
                    if item is end:
                        break
                    yield chunk(item[0], item[1])
                try:
                    results = job.future.result()
                except (GenerationCancelled, concurrent.futures.CancelledError):
                    return
                except Exception as e:  # headers are sent: report in-band, then end the stream
                    yield _sse(error_body(f"generation failed: {e}", "server_error"))
                    yield "data: [DONE]\n\n"
                    return
                state.observe(job)
                for i, r in enumerate(results):
                    yield chunk(i, None, r.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk" if chat else "text_completion",
                                "choices": [], "usage": usage(results)})
                yield "data: [DONE]\n\n"
            finally:
                stop_job(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        return state.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/api/chat")
    async def api_chat(body: ChatIn, request: Request):
        ids = prompt_ids(body.input_txt)
        results = await finish(start(request, ids, {}))
        return {"response": results[0].text}

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{"id": bot.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatlm-mini-chinese"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: CompletionIn, request: Request):
        _reject_unsupported(body, ("tools", "tool_choice", "functions", "function_call", "response_format",
                                   "top_logprobs"))
        settings, extra, n, stop = common(body, body.max_completion_tokens or body.max_tokens)
        system, history, query = _split_messages(body.messages)
        ids = prompt_ids(query, history, system)
        return await respond(request, body, ids, settings, extra, n, stop, chat=True)

    @app.post("/v1/completions")
    async def completions(body: TextCompletionIn, request: Request):
        _reject_unsupported(body, ("echo", "suffix"))
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (use n)", param="best_of", code="unsupported_parameter")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt must be one string (got a list of {len(prompts)}); send one request "
                                f"per prompt", param="prompt")
        if not prompts[0].strip():
            raise APIError(400, "the prompt is empty", param="prompt")
        settings, extra, n, stop = common(body, body.max_tokens)
        ids = bot.tokenizer(prompts[0], add_special_tokens=False)["input_ids"] + [EOS_ID]
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the limit of {cfg.max_prompt_tokens} "
                                f"(max_prompt_tokens); shorten it", code="context_length_exceeded", param="prompt")
        return await respond(request, body, ids, settings, extra, n, stop, chat=False)

    app = GuardMiddleware(app, state, cfg.max_body_bytes)
    origins = _origins(cfg.cors_origins)
    if origins:  # outermost: preflights and error answers carry the CORS headers too
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def _origins(value) -> list[str]:
    """``--cors_origins`` as a list: a comma-separated string or a list (fire may give a tuple)."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(x).strip().rstrip("/") for x in items if str(x).strip()]


def _split_messages(messages: list[Message]) -> tuple[Optional[str], list[tuple[str, str]], str]:
    """OpenAI messages -> (system text, [(user, assistant), ...], current user query)."""
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    rest = [m for m in messages if m.role not in ("system", "developer")]
    if not rest or rest[-1].role != "user":
        raise APIError(400, "the last message must have role 'user'", param="messages")
    history: list[tuple[str, str]] = []
    pending: list[str] = []
    for m in rest[:-1]:
        if m.role == "user":
            pending.append(m.text())
        else:
            history.append(("\n".join(pending), m.text()))
            pending = []
    query = "\n".join(pending + [rest[-1].text()])
    if not query.strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return ("\n".join(system) or None), history, query


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
