"""Inference: ``ChatBot`` (batch chat, streaming chat, multi-turn prompts), its streamer and the CTranslate2 engine.

Every answer goes through ``TextToTextModel.my_generate`` (``engine="torch"``) or, optionally, through a
CTranslate2 int8 copy of the same folder (``engine="ct2"``). Streaming uses one ``TokenStreamer`` per request; a
streamer whose ``cancel`` event is set raises ``GenerationCancelled`` from inside ``generate``, which is how a
disconnected client stops its generation. Decoding defaults come from the folder's ``generation_config.json``.

Multi-turn prompts follow the one layout of ``model/prompt.py`` (the chat template saved in every tokenizer). History is fitted into ``history_tokens``
newest-first, so the oldest turns are dropped first; the system message and the current query are always kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import concurrent.futures
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from config import EOS_ID, GENERATION_DEFAULTS, PAD_ID, InferConfig, make_config
from model.chat_model import SEARCH_TYPES
from model.data.checkpoint import check_model_folder, load_model_folder, pick_device
from model.prompt import render_chat, turn_line
from model.tokenizer.build import load_tokenizer

ENGINES = ("torch", "ct2")
# Settings a caller may change per request; everything else is fixed by the server's config.
GEN_KEYS = ("search_type", "max_new_tokens", "num_beams", "temperature", "top_k", "top_p",
            "repetition_penalty", "no_repeat_ngram_size", "penalty_alpha", "contrastive_top_k")
FOLDER_KEYS = ("max_new_tokens", "repetition_penalty", "no_repeat_ngram_size")  # None: generation_config.json
History = Sequence[Sequence[str]]  # [(user, assistant), ...]


class GenerationCancelled(Exception):
    """Raised inside generation when the request's cancel event is set (client gone, Ctrl-C)."""


class StopGeneration(GenerationCancelled):
    """Raised inside generation once the answer reached one of the request's stop strings (a normal end)."""


class PromptTooLong(ValueError):
    """The query (plus system message) alone does not fit ``max_prompt_tokens``."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"the prompt has {n_tokens} tokens, more than the limit of {limit} "
                         f"(max_prompt_tokens); shorten the message")
        self.n_tokens, self.limit = n_tokens, limit


@dataclass
class GenerationResult:
    text: str
    ids: list[int]  # generated ids (no decoder start token; [EOS] included when generated)
    prompt_tokens: int
    finish_reason: str  # "stop" ([EOS] reached) | "length" (max_new_tokens reached)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------------------------ streaming
class TokenStreamer(BaseStreamer):
    """Incremental detokeniser for ONE request.

    Emits text pieces whose concatenation equals ``tokenizer.decode(ids, skip_special_tokens=True)`` of the
    whole answer: each step decodes only a short window, and a piece ending in an incomplete UTF-8 sequence
    (byte-fallback tokens) is held back until the next token completes it. Pieces go to ``on_text`` or, without
    it, to an internal queue that iterating the streamer drains. ``put`` raises ``GenerationCancelled`` once
    ``cancel`` is set, which aborts ``generate`` at the next token.

    ``stop`` strings (the API's ``stop``): the text is cut before the first one found; text that could be the
    start of a stop string is held back until the next tokens decide, so streamed pieces never show any part of
    it. Once a stop string is found ``stopped`` is set and the next ``put`` raises ``StopGeneration``.
    ``text`` is everything delivered (complete after ``end``).
    """

    _END = object()

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]] = None,
                 cancel: Optional[threading.Event] = None, skip_first: bool = True, timeout: Optional[float] = None,
                 min_interval: float = 0.0, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [x for x in stop if x]
        self.stopped = False
        self._held = ""  # text that may be the start of a stop string
        self._delivered: list[str] = []
        # Pieces closer together than min_interval seconds are delivered together: each delivery wakes the
        # reading thread, and on a busy CPU those wake-ups (GIL hand-overs) cost the generating thread time.
        self.min_interval = min_interval
        self._pending: list[str] = []
        self._last_delivery = 0.0
        self.on_text = on_text
        self.cancel = cancel if cancel is not None else threading.Event()
        self.timeout = timeout
        self._skip_first = skip_first  # generate() first puts the decoder start token
        self.ids: list[int] = []
        self.n_tokens = 0  # generated tokens seen, [EOS] included
        self.eos = False
        self.ended = False
        self._prefix = 0
        self._read = 0
        self._prefix_text: Optional[str] = ""
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if hasattr(backend, "decode") and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False) else None
        self._queue: Optional[queue.Queue] = None if on_text is not None else queue.Queue()
        self.error: Optional[BaseException] = None

    # generation side ------------------------------------------------------------------------------
    def put(self, value) -> None:
        if self.cancel.is_set():
            raise GenerationCancelled()
        if self.stopped:
            raise StopGeneration()
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                if value.shape[0] != 1:
                    raise ValueError("TokenStreamer serves one request (batch size 1)")
                value = value[0]
            value = value.tolist()
        elif isinstance(value, int):
            value = [value]
        if self._skip_first:
            self._skip_first = False
            return
        for t in value:
            if self.eos:
                break
            self.n_tokens += 1
            if t == EOS_ID:
                self.eos = True
                break
            self.ids.append(int(t))
        self._emit(final=False)

    def end(self) -> None:
        if self.ended:
            return
        self._emit(final=True)
        self.ended = True
        if self._queue is not None:
            self._queue.put(self._END)

    def fail(self, exc: BaseException) -> None:
        """Hand an exception from the generation thread to the reading side."""
        self.error = exc
        self.ended = True
        if self._queue is not None:
            self._queue.put(self._END)

    def _decode(self, ids: list[int]) -> str:
        # The Rust backend directly: what tokenizer.decode(..., clean_up_tokenization_spaces=False) returns,
        # without its Python overhead (this runs once per generated token).
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, final: bool) -> None:
        if len(self.ids) == self._read and not final:
            return
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        prefix_text = self._prefix_text
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = None
            if self.stops:
                piece = self._cut(piece)
            if piece:
                self._pending.append(piece)
        if final and self._held and not self.stopped:
            self._pending.append(self._held)
            self._held = ""
        if self._pending and (final or self.min_interval <= 0
                              or time.perf_counter() - self._last_delivery >= self.min_interval):
            self._deliver()

    def _cut(self, piece: str) -> str:
        """The part of ``piece`` that is safe to show, given the stop strings."""
        if self.stopped:
            return ""
        buf = self._held + piece
        hits = [i for i in (buf.find(x) for x in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)]
        keep = 0  # the longest end of buf that begins a stop string
        for x in self.stops:
            for k in range(min(len(x) - 1, len(buf)), keep, -1):
                if buf.endswith(x[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    @property
    def text(self) -> str:
        return "".join(self._delivered)

    def _deliver(self) -> None:
        piece = "".join(self._pending)
        self._pending.clear()
        self._delivered.append(piece)
        self._last_delivery = time.perf_counter()
        if self.on_text is not None:
            self.on_text(piece)
        else:
            self._queue.put(piece)

    # reading side -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        if self._queue is None:
            raise TypeError("a TokenStreamer with on_text is not iterable")
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._END:
                if self.error is not None and not isinstance(self.error, GenerationCancelled):
                    raise self.error
                return
            yield item


# --------------------------------------------------------------------------------------------- ct2
def convert_to_ct2(model_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Convert a plain HF T5 folder to CTranslate2 once (float32 weights; quantised when loaded).

    A marker records the source weights' size and mtime so a retrained model is converted again.
    """
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:  # optional dependency
        raise RuntimeError("--engine ct2 needs the ctranslate2 package: pip install ctranslate2==4.8.5") from e
    src = check_model_folder(model_dir)
    out = Path(out_dir) if out_dir else src / "ct2"
    weights = src / "model.safetensors"
    if not weights.is_file():
        weights = src / "pytorch_model.bin"
    st = weights.stat()
    marker = {"source": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    mfile = out / "source.json"
    if mfile.is_file():
        try:
            if json.loads(mfile.read_text(encoding="utf-8")) == marker and (out / "model.bin").is_file():
                return out
        except json.JSONDecodeError:
            pass
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    TransformersConverter(str(src)).convert(str(tmp), force=True)
    (tmp / "source.json").write_text(json.dumps(marker), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class CT2Engine:
    """The same model through CTranslate2 (int8 on CPU by default). No contrastive search."""

    def __init__(self, model_dir: str | Path, tokenizer, cfg: InferConfig):
        import ctranslate2

        path = convert_to_ct2(model_dir, cfg.ct2_dir)
        dev = pick_device(cfg.device)
        device = "cuda" if dev.type == "cuda" else "cpu"
        compute = cfg.ct2_compute_type
        if compute == "auto":
            compute = "int8_float16" if device == "cuda" else "int8"
        threads = cfg.torch_threads or torch.get_num_threads()
        self.translator = ctranslate2.Translator(str(path), device=device, compute_type=compute,
                                                 intra_threads=threads,
                                                 inter_threads=max(1, min(cfg.max_concurrency, os.cpu_count() or 1)))
        self.tokenizer = tokenizer
        self.compute_type = compute

    def generate(self, batch_ids: list[list[int]], s: dict, streamer: Optional[TokenStreamer] = None
                 ) -> list[list[int]]:
        st = s["search_type"]
        if st == "contrastive":
            raise ValueError("contrastive search is not available with --engine ct2; use --engine torch")
        kw = dict(max_decoding_length=s["max_new_tokens"], repetition_penalty=s["repetition_penalty"],
                  no_repeat_ngram_size=s["no_repeat_ngram_size"], return_end_token=True, max_input_length=0)
        if st == "beam":
            kw.update(beam_size=s["num_beams"])
        elif st == "sampling":
            kw.update(beam_size=1, sampling_topk=s["top_k"], sampling_topp=s["top_p"],
                      sampling_temperature=s["temperature"])
        else:
            kw.update(beam_size=1)
        cancelled = []
        if streamer is not None and kw["beam_size"] == 1:
            def callback(step) -> bool:
                try:
                    streamer.put([step.token_id])
                except GenerationCancelled:
                    cancelled.append(True)
                    return True
                return False
            kw["callback"] = callback
        src = [self.tokenizer.convert_ids_to_tokens(ids) for ids in batch_ids]
        res = self.translator.translate_batch(src, **kw)
        if cancelled:
            raise StopGeneration() if streamer.stopped else GenerationCancelled()
        outs = [self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in res]
        if streamer is not None and kw["beam_size"] != 1:
            streamer.put(outs[0])  # beams are known only at the end: stream the finished answer
        return outs


# ------------------------------------------------------------------------------------------ ChatBot
def torch_thread_init(n: Optional[int] = None) -> Callable[[], None]:
    """An initializer for generation threads: apply the intra-op thread count in the new thread.

    torch.set_num_threads only reaches the OpenMP state of the thread that calls it; a fresh thread starts
    with OpenMP's default (all cores), which on a busy 2-core machine made small ops many times slower.
    """
    n = n or torch.get_num_threads()
    return lambda: torch.set_num_threads(n)


def folder_generation_defaults(model_dir: str | Path, cfg: InferConfig) -> dict:
    """The settings left unset (None) in ``cfg``, from the folder's ``generation_config.json``: what plain
    ``model.generate`` uses, so the CLI, the API and transformers give one answer for one prompt."""
    saved = {}
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for k in FOLDER_KEYS:
        if getattr(cfg, k) is None:
            v = saved.get(k)
            out[k] = GENERATION_DEFAULTS[k] if v is None else v
    if out.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(out["repetition_penalty"])
    return out


class ChatBot:
    """Loads a model folder and answers: ``chat`` (batch), ``stream_chat`` (one streamer per call), multi-turn.

    ``ChatBot(model_dir="model_save/sft", search_type="sampling")`` or ``ChatBot(InferConfig(...))``; every
    generation setting may also be given per call (``bot.chat("你好", max_new_tokens=64)``).
    """

    def __init__(self, cfg: Optional[InferConfig] = None, **overrides):
        if cfg is None:
            cfg = make_config(InferConfig, **overrides)
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if cfg.engine not in ENGINES:
            raise ValueError(f"unknown engine {cfg.engine!r}; expected one of {', '.join(ENGINES)}")
        self.model_dir = check_model_folder(cfg.model_dir)
        self.cfg = cfg = dataclasses.replace(cfg, **folder_generation_defaults(self.model_dir, cfg))
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.defaults = self.settings()  # validates the config's own settings
        self.model_name = cfg.model_name or self.model_dir.resolve().name
        self.engine = cfg.engine
        if cfg.engine == "torch":
            self.model, self.tokenizer = load_model_folder(self.model_dir, device=cfg.device)
            self.ct2 = None
        else:
            self.model = None
            self.tokenizer = load_tokenizer(self.model_dir)
            self.ct2 = CT2Engine(self.model_dir, self.tokenizer, cfg)
        self._pool = None
        self._pool_lock = threading.Lock()

    # settings ----------------------------------------------------------------------------------------
    def settings(self, **overrides) -> dict:
        """The config's generation settings with per-request overrides, checked (clear ValueError)."""
        unknown = sorted(set(overrides) - set(GEN_KEYS))
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(unknown)}; valid: {', '.join(GEN_KEYS)}")
        s = {k: getattr(self.cfg, k) for k in GEN_KEYS}
        s.update({k: v for k, v in overrides.items() if v is not None})
        if s["search_type"] not in SEARCH_TYPES:
            raise ValueError(f"unknown search_type {s['search_type']!r}; expected one of {', '.join(SEARCH_TYPES)}")
        for k in ("max_new_tokens", "num_beams", "top_k", "contrastive_top_k"):
            if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 1:
                raise ValueError(f"{k} must be a positive integer, got {s[k]!r}")
        if not isinstance(s["no_repeat_ngram_size"], int) or s["no_repeat_ngram_size"] < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {s['no_repeat_ngram_size']!r}")
        if not 0 < float(s["temperature"]) <= 100:
            raise ValueError(f"temperature must be in (0, 100], got {s['temperature']!r}")
        if not 0 < float(s["top_p"]) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {s['top_p']!r}")
        if not 0 < float(s["repetition_penalty"]) <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {s['repetition_penalty']!r}")
        if not 0 <= float(s["penalty_alpha"]) <= 1:
            raise ValueError(f"penalty_alpha must be in [0, 1], got {s['penalty_alpha']!r}")
        return s

    # prompts -----------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_input_ids(self, query: str, history: Optional[History] = None, system: Optional[str] = None,
                        strict: bool = False) -> list[int]:
        """Encoder ids for a query with history; oldest turns dropped first to fit the budgets.

        ``strict`` raises ``PromptTooLong`` when the query (and system message) alone is over
        ``max_prompt_tokens``; otherwise the query keeps its last tokens.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        limit = self.cfg.max_prompt_tokens - 1  # room for [EOS]
        # Budgets are counted on the turns of model/prompt.py's layout one by one; the turns that fit are then
        # rendered through the folder's chat template and encoded whole, as the training rows are (and as
        # tokenizer.apply_chat_template(messages, add_generation_prompt=True) does).
        head = self._encode(turn_line("system", system) + "\n") if system else []
        labelled = bool(history) or bool(system)
        q = self._encode(turn_line("user", query) if labelled else query)
        if len(head) + len(q) > limit:
            if strict:
                raise PromptTooLong(len(head) + len(q) + 1, self.cfg.max_prompt_tokens)
            if len(head) >= limit // 2:
                head = []
            return head + q[-(limit - len(head)):] + [EOS_ID]  # the end of the query; no room for turns
        budget = min(self.cfg.history_tokens, limit - len(head) - len(q))
        turns = list(history or [])
        keep, used = 0, 0
        for i, turn in enumerate(reversed(turns)):
            if len(turn) != 2:
                raise ValueError(f"history turn {len(turns) - 1 - i} must be a (user, assistant) pair, got {turn!r}")
            n = len(self._encode(turn_line("user", turn[0]) + "\n" + turn_line("assistant", turn[1]) + "\n"))
            if used + n > budget:
                break
            keep, used = keep + 1, used + n
        while True:
            ids = self.tokenizer(self.render_prompt(query, turns[len(turns) - keep:], system))["input_ids"]
            if len(ids) <= limit + 1 or keep == 0:
                return ids if len(ids) <= limit + 1 else head + q + [EOS_ID]
            keep -= 1  # merges across turn boundaries made the whole longer than its parts: drop one more

    def render_prompt(self, query: str, history: Optional[History] = None, system: Optional[str] = None) -> str:
        """The prompt text (without [EOS]) through the folder's chat template; model/prompt.py's layout when
        the tokenizer has none (folders saved before the template)."""
        msgs = [{"role": "system", "content": system}] if system else []
        for u, a in history or []:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": query})
        return render_chat(msgs, getattr(self.tokenizer, "chat_template", None))

    # generation --------------------------------------------------------------------------------------
    def new_streamer(self, on_text: Optional[Callable[[str], None]] = None,
                     cancel: Optional[threading.Event] = None, stop: Sequence[str] = ()) -> TokenStreamer:
        """A fresh streamer for one request (torch's generate first puts the decoder start token; ct2 does not)."""
        return TokenStreamer(self.tokenizer, on_text=on_text, cancel=cancel, skip_first=self.ct2 is None,
                             min_interval=self.cfg.stream_interval_s, stop=stop)

    def _run(self, batch_ids: list[list[int]], s: dict, streamer: Optional[TokenStreamer] = None
             ) -> list[list[int]]:
        """Generated ids per prompt, cut after the first [EOS] (which is kept)."""
        if self.ct2 is not None:
            outs = self.ct2.generate(batch_ids, s, streamer)
        else:
            width = max(len(x) for x in batch_ids)
            ids = torch.full((len(batch_ids), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(batch_ids):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            dev = self.model.device
            extra = {k: s[k] for k in GEN_KEYS if k not in ("search_type", "max_new_tokens")}
            out = self.model.my_generate(ids.to(dev), mask.to(dev), max_new_tokens=s["max_new_tokens"],
                                         search_type=s["search_type"], streamer=streamer, **extra)
            outs = [row[1:] for row in out.tolist()]  # drop the decoder start token
        cut = []
        for row in outs:
            if EOS_ID in row:
                row = row[:row.index(EOS_ID) + 1]
            cut.append(row)
        return cut

    def _result(self, gen: list[int], n_prompt: int) -> GenerationResult:
        text = self.tokenizer.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(text=text, ids=gen, prompt_tokens=n_prompt,
                                finish_reason="stop" if gen and gen[-1] == EOS_ID else "length")

    def generate(self, input_ids: list[int], streamer: Optional[TokenStreamer] = None, **overrides
                 ) -> GenerationResult:
        """One prompt (ids from ``build_input_ids``), blocking; the API runs this in its worker threads."""
        s = self.settings(**overrides)
        try:
            gen = self._run([list(input_ids)], s, streamer)[0]
        except StopGeneration:  # a stop string ended the answer (the streamer holds its text)
            gen = list(streamer.ids)
        except BaseException as e:
            if streamer is not None:
                streamer.fail(e)
            raise
        if streamer is not None:
            streamer.end()
            if streamer.stopped:
                return GenerationResult(text=streamer.text, ids=gen[:streamer.n_tokens], prompt_tokens=len(input_ids),
                                        finish_reason="stop")
        return self._result(gen, len(input_ids))

    def chat(self, query: str | Sequence[str], history: Optional[History | Sequence[History]] = None,
             system: Optional[str] = None, **overrides) -> str | list[str]:
        """Answer one query (returns a string) or a batch of queries (a list; ``history`` one per query)."""
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        if not queries:
            return []
        histories = [history] if single else (list(history) if history is not None else [None] * len(queries))
        if len(histories) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(histories)} histories")
        s = self.settings(**overrides)
        batch = [self.build_input_ids(q, h, system) for q, h in zip(queries, histories)]
        texts = [self._result(g, len(b)).text for g, b in zip(self._run(batch, s), batch)]
        return texts[0] if single else texts

    def stream_chat(self, query: str, history: Optional[History] = None, system: Optional[str] = None,
                    cancel: Optional[threading.Event] = None, **overrides) -> Iterator[str]:
        """Yield the answer in pieces as it is generated (own streamer and thread per call).

        Closing the iterator early (``break``, Ctrl-C) or setting ``cancel`` stops the generation.
        """
        s = self.settings(**overrides)
        ids = self.build_input_ids(query, history, system)
        streamer = self.new_streamer(cancel=cancel)

        def work():
            try:
                self.generate(ids, streamer=streamer, **s)
            except GenerationCancelled:
                pass
            except BaseException as e:  # surfaced to the reader by TokenStreamer.__iter__
                streamer.fail(e)

        fut = self._stream_pool().submit(work)
        try:
            yield from streamer
        finally:
            if not fut.done():
                streamer.cancel.set()
            fut.result()

    def _stream_pool(self):
        """Reused threads for stream_chat: starting a thread per answer cost ms on a busy CPU."""
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=64, thread_name_prefix="chatbot-stream", initializer=torch_thread_init())
        return self._pool
