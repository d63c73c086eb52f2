"""The HTTP API: the reference's ``POST /api/chat`` plus an OpenAI-compatible ``/v1/chat/completions``.

Safe under load:
* generation runs in a thread pool of ``max_concurrency`` workers, never on the event loop; at most
  ``max_queue`` more requests wait, beyond that the answer is 503 with ``Retry-After``;
* each request has its own streamer and cancel event: a client that disconnects stops its generation at the
  next token (a queued request that is dropped never starts);
* bodies over ``max_body_bytes`` get 413, malformed JSON 400, invalid fields 422, a prompt over
  ``max_prompt_tokens`` or a ``max_tokens`` over ``max_new_tokens`` 400: always a JSON error, never a 500;
* a key (``api_key`` or env ``CHATLM_API_KEY``) turns on bearer auth (constant-time comparison); no key, no auth.
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
from typing import Any, Literal, Optional, Union

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import InferConfig
from model.infer import ChatBot, GenerationCancelled, PromptTooLong, torch_thread_init

API_KEY_ENV = "CHATLM_API_KEY"


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
    """Auth first (every path but ``/health``), then the body limit, before FastAPI reads anything.

    Bodies are read up to ``max_bytes`` (413 beyond, checked on Content-Length and on chunked bodies alike)
    and replayed to the app, so no body can make the server buffer more than the limit, and a client without
    the key learns nothing about its request but 401.
    """

    OPEN_PATHS = ("/health",)

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


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    # extensions (not in OpenAI's API)
    search_type: Optional[Literal["greedy", "beam", "sampling", "contrastive"]] = None
    top_k: Optional[int] = Field(None, ge=1, le=1000)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)


# ------------------------------------------------------------------------------------------ state
class ServerState:
    """Worker pool, admission counter and statistics (read by ``GET /health``)."""

    def __init__(self, bot: ChatBot, cfg: InferConfig):
        self.bot, self.cfg = bot, cfg
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrency),
                                                              thread_name_prefix="chatlm-gen",
                                                              initializer=torch_thread_init(cfg.torch_threads))
        self.lock = threading.Lock()
        self.in_flight = 0  # admitted and not finished: running + queued
        self.running = 0
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected": 0, "errors": 0}
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

    def submit(self, ids: list[int], settings: dict, streamer) -> concurrent.futures.Future:
        """Queue one generation; the slot taken by ``admit`` is freed when it ends or is dropped."""
        cancel = streamer.cancel
        with self.lock:
            self.cancels.add(cancel)

        def work():
            with self.lock:
                self.running += 1
            try:
                if cancel.is_set():
                    raise GenerationCancelled()
                return self.bot.generate(ids, streamer=streamer, **settings)
            finally:
                with self.lock:
                    self.running -= 1

        def done(f: concurrent.futures.Future):
            with self.lock:
                self.in_flight -= 1
                self.cancels.discard(cancel)
                if f.cancelled():
                    self.stats["cancelled"] += 1
                elif isinstance(f.exception(), GenerationCancelled):
                    self.stats["cancelled"] += 1
                elif f.exception() is not None:
                    self.stats["errors"] += 1
                else:
                    self.stats["completed"] += 1

        try:
            fut = self.executor.submit(work)
        except RuntimeError:  # executor shut down
            with self.lock:
                self.in_flight -= 1
                self.cancels.discard(cancel)
            raise APIError(503, "server is shutting down", type_="server_error", code="shutting_down")
        fut.add_done_callback(done)
        return fut

    def health(self) -> dict:
        with self.lock:
            return {"status": "ok", "model": self.bot.model_name, "engine": self.bot.engine,
                    "auth": self.api_key is not None, "in_flight": self.in_flight, "running": self.running,
                    "max_concurrency": self.cfg.max_concurrency, "max_queue": self.cfg.max_queue, **self.stats}

    def shutdown(self) -> None:
        with self.lock:
            for c in self.cancels:
                c.set()
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


# ------------------------------------------------------------------------------------------- app
def create_app(bot: ChatBot, cfg: Optional[InferConfig] = None) -> FastAPI:
    """The FastAPI app around one loaded ``ChatBot`` (its config gives the limits unless ``cfg`` is given)."""
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

    def start(request: Request, ids: list[int], settings: dict, on_text=None):
        """Admit, create the request's own streamer, queue the generation and watch for disconnects."""
        try:
            settings = bot.settings(**settings)
        except ValueError as e:
            raise APIError(400, str(e))
        state.admit()
        streamer = bot.new_streamer(on_text=on_text or (lambda _piece: None), cancel=threading.Event())
        fut = state.submit(ids, settings, streamer)
        task = asyncio.get_running_loop().create_task(_watch_disconnect(request, streamer.cancel))
        watchers.add(task)
        task.add_done_callback(watchers.discard)
        return fut, streamer

    async def finish(fut: concurrent.futures.Future, streamer):
        try:
            return await asyncio.wrap_future(fut)
        except GenerationCancelled:
            raise APIError(499, "request cancelled", code="cancelled")
        except ValueError as e:  # settings the engine cannot honour (e.g. contrastive on ct2)
            raise APIError(400, str(e))
        finally:
            if not fut.done():
                streamer.cancel.set()
                fut.cancel()

    # ---------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return state.health()

    @app.post("/api/chat")
    async def api_chat(body: ChatIn, request: Request):
        ids = prompt_ids(body.input_txt)
        fut, streamer = start(request, ids, {})
        result = await finish(fut, streamer)
        return {"response": result.text}

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{"id": bot.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatlm-mini-chinese"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: CompletionIn, request: Request):
        if body.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if body.stop:
            raise APIError(400, "stop sequences are not supported", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
        system, history, query = _split_messages(body.messages)
        max_new = body.max_completion_tokens or body.max_tokens
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
        ids = prompt_ids(query, history, system)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": cid, "created": created, "model": bot.model_name}

        if not body.stream:
            fut, streamer = start(request, ids, settings)
            r = await finish(fut, streamer)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                 "logprobs": None, "finish_reason": r.finish_reason}],
                    "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                              "total_tokens": r.prompt_tokens + r.completion_tokens}}

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        end = object()

        def on_text(piece: str) -> None:  # called in the worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        fut, streamer = start(request, ids, settings, on_text=on_text)
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(pieces.put_nowait, end))
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None) -> str:
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    item = await pieces.get()
                    if item is end:
                        break
                    yield chunk({"content": item})
                try:
                    r = fut.result()
                except GenerationCancelled:
                    return
                except Exception as e:  # headers are sent: report in-band, then end the stream
                    yield _sse(error_body(f"generation failed: {e}", "server_error"))
                    yield "data: [DONE]\n\n"
                    return
                yield chunk({}, r.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                                          "total_tokens": r.prompt_tokens + r.completion_tokens}})
                yield "data: [DONE]\n\n"
            finally:
                if not fut.done():  # the client left (or the server stops): stop generating
                    streamer.cancel.set()
                    fut.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return GuardMiddleware(app, state, cfg.max_body_bytes)


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
    """The ServerState of an app made by ``create_app`` (through its guard)."""
    inner = app.app if isinstance(app, GuardMiddleware) else app
    return inner.state.chat


# ------------------------------------------------------------------------------------------ running
def serve(cfg: InferConfig) -> None:
    """Load the model and serve until Ctrl-C (``python api_demo.py``)."""
    bot = ChatBot(cfg)
    app = create_app(bot)
    auth = "on" if get_state(app).api_key else "off (set --api_key or CHATLM_API_KEY to require a key)"
    print(f"serving {bot.model_name} ({bot.engine}) on http://{cfg.host}:{cfg.port}  auth: {auth}", flush=True)
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


if __name__ == "__main__":  # python -m model.server --model_dir=model_save/demo: one sample exchange
    import fire
    fire.Fire(lambda model_dir="model_save/demo", prompt="你好", max_new_tokens=64: print(
        sample_exchange(model_dir, prompt=prompt, max_new_tokens=max_new_tokens)))
