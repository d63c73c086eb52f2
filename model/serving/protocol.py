"""The wire format of the HTTP API: request bodies, their parsing into decoding settings, errors, and the
JSON and server-sent-event shapes of an answer. Plain functions and classes: each is testable without a server.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from config import InferConfig
from model.serving.infer import GenerationResult

# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An answer other than 200: its status, OpenAI-shaped error fields and extra headers."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers, self.param = (
            status, message, type_, code, headers, param)


def error_body(message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    """OpenAI's error shape, so OpenAI clients raise a readable exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


# ---------------------------------------------------------------------------------------- parsing
@dataclass
class GenerationRequest:
    """What both completion endpoints ask of the decoder: settings for ``ChatBot.settings``, the batch decoder's
    extras (seed, penalties), the number of choices and the stop strings."""
    settings: dict
    extra: dict
    n: int = 1
    stop: list[str] = field(default_factory=list)


def reject_unsupported(body: BaseModel, names: tuple[str, ...]) -> None:
    """A 400 naming the first of ``names`` that the body sets: fields this plain text model cannot honour."""
    for name in names:
        v = getattr(body, name, None)
        if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
            continue  # the default: plain text
        if v not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported by this server (a plain text chat model); "
                                f"remove the field", param=name, code="unsupported_parameter")


def _stop_strings(stop: Union[str, list[str], None]) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4:
        raise APIError(400, f"stop takes at most 4 strings, got {len(stop)}", param="stop")
    if any(not x for x in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stop


def _search_settings(body: GenerationIn, max_new: Optional[int]) -> dict[str, Any]:
    """``temperature`` 0 means greedy, above 0 sampling, unless ``search_type`` says otherwise."""
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
    return settings


def parse_generation(body: GenerationIn, max_new: Optional[int], cfg: InferConfig) -> GenerationRequest:
    """The fields both completion endpoints share, checked against the server's limits."""
    reject_unsupported(body, ("logit_bias", "logprobs"))
    n = body.n or 1
    if n > cfg.max_n:
        raise APIError(400, f"n={n} is over this server's limit of {cfg.max_n} choices (max_n)", param="n")
    stop = _stop_strings(body.stop)
    if max_new is not None and max_new > cfg.max_new_tokens:
        raise APIError(400, f"max_tokens {max_new} is over this server's limit of {cfg.max_new_tokens}",
                       param="max_tokens", code="max_tokens_too_large")
    extra = {"seed": body.seed, "presence_penalty": body.presence_penalty or 0.0,
             "frequency_penalty": body.frequency_penalty or 0.0}
    return GenerationRequest(_search_settings(body, max_new), extra, n, stop)


def split_messages(messages: list[Message]) -> tuple[Optional[str], list[tuple[str, str]], str]:
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


def single_prompt(body: TextCompletionIn) -> str:
    """The one prompt string of a /v1/completions body (lists of prompts and ``best_of`` are refused)."""
    reject_unsupported(body, ("echo", "suffix"))
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported (use n)", param="best_of", code="unsupported_parameter")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, f"prompt must be one string (got a list of {len(prompts)}); send one request "
                            f"per prompt", param="prompt")
    if not prompts[0].strip():
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompts[0]


# ---------------------------------------------------------------------------------------- answers
def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Reply:
    """The shapes of one completion answer, plain or streamed: chat (``chat.completion``) or text
    (``text_completion``), with one id and creation time shared by every chunk."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.prompt_tokens = chat, prompt_tokens
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                     "model": model}
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, results: list[GenerationResult]) -> dict:
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c, "total_tokens": self.prompt_tokens + c}

    def body(self, results: list[GenerationResult]) -> dict:
        """The non-streamed answer."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": choices, "usage": self.usage(results)}

    def chunk(self, i: int, text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> str:
        """One streamed event for choice ``i``: its opening role (chat), a text piece, or its finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**self.head, "object": self.chunk_object, "choices": [choice]})

    def usage_chunk(self, results: list[GenerationResult]) -> str:
        return sse({**self.head, "object": self.chunk_object, "choices": [], "usage": self.usage(results)})
