"""Continuous batching for the server: every active sequence decodes in one shared forward pass per step.

``BatchDecoder`` owns one thread that loops:

1. **Join.** Requests that arrived since the last step are prefilled together: their prompts are encoded in one
   padded encoder pass and their first decoder step (the decoder start token) runs in one pass, which also
   computes their cross-attention keys/values. Their first token is emitted at once (time to first token does
   not wait for the batch), then their rows are merged into the batch.
2. **Step.** One decoder forward for all rows: each row feeds its last token, with its own rows of the KV cache.
   Rows started at different times have self-attention caches of different lengths; the shorter ones are
   *left-padded* with masked positions, so every row's newest token sits in the same column. T5's decoder uses
   a relative position bias, which depends only on ``key position - query position``: left padding leaves
   every real distance unchanged, and the padding mask removes the padded keys exactly (weight 0 after the
   softmax). Encoder states and cross-attention keys/values are right-padded with the encoder mask.
3. **Choose.** Per row: repetition penalty, no-repeat n-gram ban, OpenAI presence/frequency penalties, then
   greedy argmax or sampling (temperature, top-k, top-p) with the request's own ``torch.Generator`` (``seed``).
   The logits processors are the ones ``model.generate`` applies, on each row's own decoded ids, so a greedy
   answer equals the same request decoded alone.
4. **Leave.** A row that emits ``[EOS]``, reaches its ``max_new_tokens``, hits a stop string or whose client is
   gone (its streamer's cancel event) leaves the batch; padding columns no remaining row needs are trimmed.

Beam and contrastive search (and the CTranslate2 engine) keep the one-request-per-worker path of the server.
"""
from __future__ import annotations

import concurrent.futures
import random
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                   TopPLogitsWarper)
from transformers.modeling_outputs import BaseModelOutput

from config import EOS_ID, PAD_ID
from model.serving.infer import GenerationCancelled, GenerationResult, TokenStreamer

BATCH_SEARCH_TYPES = ("greedy", "sampling")


@dataclass
class _Request:
    ids: list[int]
    settings: dict
    streamers: list[TokenStreamer]
    future: concurrent.futures.Future
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    results: list = field(default_factory=list)
    left: int = 0
    failed: bool = False


@dataclass
class _Seq:
    req: _Request
    index: int  # choice index within the request
    streamer: TokenStreamer
    generator: Optional[torch.Generator]
    ids: list[int] = field(default_factory=list)  # generated ids ([EOS] kept when generated)
    ngrams: dict = field(default_factory=dict)  # (n-1)-gram prefix -> banned next tokens
    counts: dict = field(default_factory=dict)  # token -> times generated (presence/frequency penalties)

    @property
    def s(self) -> dict:
        return self.req.settings


class BatchDecoder:
    """One decoding thread shared by all greedy/sampling requests of a torch ``ChatBot``.

    ``max_requests`` requests decode at once (their ``n`` choices included); more wait in arrival order.
    ``submit`` returns a future of one ``GenerationResult`` per choice.
    """

    def __init__(self, bot, max_requests: int, thread_init=None):
        if bot.model is None:
            raise ValueError("batched decoding needs the torch engine")
        self.bot, self.model, self.tokenizer = bot, bot.model, bot.tokenizer
        self.max_requests = max(1, max_requests)
        self.thread_init = thread_init
        self.cond = threading.Condition()
        self.waiting: list[_Request] = []
        self.active_requests = 0
        self.rows: list[_Seq] = []
        self.closed = False
        self.thread: Optional[threading.Thread] = None
        self.steps = 0  # decoder steps run (for /metrics)
        self.row_steps = 0  # sum of batch sizes over steps
        self._state: Optional[dict] = None

    # ---------------------------------------------------------------------------------------- public
    def submit(self, ids: list[int], settings: dict, streamers: list[TokenStreamer], seed: Optional[int] = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> concurrent.futures.Future:
        if settings["search_type"] not in BATCH_SEARCH_TYPES:
            raise ValueError(f"batched decoding supports {', '.join(BATCH_SEARCH_TYPES)}, "
                             f"not {settings['search_type']!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        req = _Request(list(ids), settings, list(streamers), fut, seed, presence_penalty or 0.0,
                       frequency_penalty or 0.0, results=[None] * len(streamers), left=len(streamers))
        with self.cond:
            if self.closed:
                raise RuntimeError("the batch decoder is shut down")
            self.waiting.append(req)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="chatlm-batch", daemon=True)
                self.thread.start()
            self.cond.notify()
        return fut

    def stats(self) -> dict:
        with self.cond:
            return {"running": self.active_requests, "waiting": len(self.waiting), "batch_rows": len(self.rows),
                    "steps": self.steps, "row_steps": self.row_steps}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for r in self.waiting:
                for st in r.streamers:
                    st.cancel.set()
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------------ loop
    def _run(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.rows:
                    self.cond.wait()
                if self.closed and not self.waiting and not self.rows:
                    return
                dropped = [r for r in self.waiting if r.future.cancelled() or r.streamers[0].cancel.is_set()]
                self.waiting = [r for r in self.waiting if r not in dropped]
                joining = []
                while self.waiting and self.active_requests < self.max_requests:
                    req = self.waiting.pop(0)
                    self.active_requests += 1
                    joining.append(req)
            for req in dropped:  # dropped while waiting: never starts
                if not req.future.cancelled():
                    self._fail_request(req, GenerationCancelled(), active=False)
            try:
                with torch.inference_mode():
                    if self.rows:
                        self._step()
                    if joining:
                        self._join(joining)
            except BaseException as e:  # a bug or OOM: fail every request in the batch, keep serving
                for seq in list(self.rows):
                    self._finish(seq, error=e)
                for req in joining:
                    if not req.future.done():
                        self._fail_request(req, e)
                self.rows, self._state = [], None

    # ---------------------------------------------------------------------------------------- joining
    def _join(self, reqs: list[_Request]) -> None:
        seqs: list[_Seq] = []
        for req in reqs:
            if not req.future.set_running_or_notify_cancel():  # cancelled while waiting: never starts
                with self.cond:
                    self.active_requests -= 1
                continue
            if req.streamers[0].cancel.is_set():
                self._fail_request(req, GenerationCancelled())
                continue
            base = req.seed if req.seed is not None else random.getrandbits(62)
            for i, st in enumerate(req.streamers):
                gen = None
                if req.settings["search_type"] == "sampling":
                    gen = torch.Generator(device=self.model.device).manual_seed(base + i)
                seq = _Seq(req, i, st, gen)
                if (req.settings["no_repeat_ngram_size"] or 0) == 1:  # unigrams: the start token is one
                    seq.ngrams[()] = {PAD_ID}
                seqs.append(seq)
        if not seqs:
            return
        dev = self.model.device
        width = max(len(s.req.ids) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s.req.ids)] = torch.tensor(s.req.ids)
            mask[i, :len(s.req.ids)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        start = torch.full((len(seqs), 1), PAD_ID, dtype=torch.long, device=dev)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                         decoder_input_ids=start, cache=cache, use_cache=True, return_dict=True)
        cache = out.cache
        new = {
            "enc": enc, "enc_mask": mask,
            "self": [(l.keys, l.values) for l in cache.self_attention_cache.layers],
            "cross": [(l.keys, l.values) for l in cache.cross_attention_cache.layers],
            "dec_mask": torch.ones((len(seqs), 1), dtype=torch.long, device=dev),
            "hist": start,
        }
        for s in seqs:
            s.streamer.put([PAD_ID])  # what generate() streams first: the decoder start token
        tokens = self._choose(out.logits[:, -1, :], seqs, new["hist"])
        self._merge(new, seqs)
        self._advance(tokens, first_row=len(self.rows) - len(seqs))

    def _merge(self, new: dict, seqs: list[_Seq]) -> None:
        st = self._state
        if st is None:
            self._state, self.rows = new, list(seqs)
            return
        t_old, t_new = st["dec_mask"].shape[1], new["dec_mask"].shape[1]
        t = max(t_old, t_new)
        s_old, s_new = st["enc_mask"].shape[1], new["enc_mask"].shape[1]
        s = max(s_old, s_new)
        left = lambda x, n: F.pad(x, (0, 0, n, 0)) if x.dim() == 4 else F.pad(x, (n, 0))  # noqa: E731
        right = lambda x, n: F.pad(x, (0, 0, 0, n)) if x.dim() >= 3 else F.pad(x, (0, n))  # noqa: E731
        for key, pad, width_old, width_new, full in (("self", left, t_old, t_new, t), ("cross", right, s_old, s_new, s)):
            st[key] = [(torch.cat([pad(ko, full - width_old), pad(kn, full - width_new)]),
                        torch.cat([pad(vo, full - width_old), pad(vn, full - width_new)]))
                       for (ko, vo), (kn, vn) in zip(st[key], new[key])]
        for key, pad, wo, wn, full in (("dec_mask", left, t_old, t_new, t), ("hist", left, t_old, t_new, t),
                                       ("enc", right, s_old, s_new, s), ("enc_mask", right, s_old, s_new, s)):
            st[key] = torch.cat([pad(st[key], full - wo), pad(new[key], full - wn)])
        self.rows.extend(seqs)

    # ------------------------------------------------------------------------------------------ steps
    def _step(self) -> None:
        st = self._state
        dev = self.model.device
        last = torch.tensor([s.ids[-1] for s in self.rows], dtype=torch.long, device=dev).unsqueeze(1)
        cache = EncoderDecoderCache([(sk, sv, ck, cv) for (sk, sv), (ck, cv) in zip(st["self"], st["cross"])])
        dec_mask = torch.cat([st["dec_mask"], torch.ones_like(last)], dim=1)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=st["enc"]), attention_mask=st["enc_mask"],
                         decoder_input_ids=last, decoder_attention_mask=dec_mask, cache=cache, use_cache=True,
                         return_dict=True)
        st["self"] = [(l.keys, l.values) for l in out.cache.self_attention_cache.layers]
        st["dec_mask"] = dec_mask
        st["hist"] = torch.cat([st["hist"], last], dim=1)
        self.steps += 1
        self.row_steps += len(self.rows)
        tokens = self._choose(out.logits[:, -1, :], self.rows, st["hist"])
        self._advance(tokens, first_row=0, count=len(tokens))

    def _choose(self, logits: torch.Tensor, seqs: list[_Seq], hist: torch.Tensor) -> list[int]:
        """The next token of each row, through the same logits processors ``generate`` applies."""
        scores = logits.float()
        pen = torch.tensor([float(s.s["repetition_penalty"] or 1.0) for s in seqs], device=scores.device)
        if (pen != 1.0).any():  # hist is left-padded with [PAD], the decoder start token every row holds
            g = scores.gather(1, hist)
            p = pen.unsqueeze(1)
            g = torch.where(g < 0, g * p, g / p)
            scores = scores.scatter(1, hist, g)
        banned_rows, banned_cols = [], []
        for r, s in enumerate(seqs):
            n = s.s["no_repeat_ngram_size"] or 0
            seq = [PAD_ID] + s.ids
            if n > 0 and len(seq) + 1 >= n:
                for t in s.ngrams.get(tuple(seq[len(seq) - n + 1:]), ()):
                    banned_rows.append(r)
                    banned_cols.append(t)
        if banned_rows:
            scores[banned_rows, banned_cols] = -float("inf")
        for r, s in enumerate(seqs):
            if s.counts and (s.req.presence_penalty or s.req.frequency_penalty):
                toks = torch.tensor(list(s.counts), device=scores.device)
                c = torch.tensor(list(s.counts.values()), dtype=scores.dtype, device=scores.device)
                scores[r, toks] -= c * s.req.frequency_penalty + s.req.presence_penalty
        out = scores.argmax(dim=-1).tolist()
        for r, s in enumerate(seqs):
            if s.generator is None:
                continue
            warp = LogitsProcessorList([TemperatureLogitsWarper(float(s.s["temperature"])),
                                        TopKLogitsWarper(top_k=int(s.s["top_k"])),
                                        TopPLogitsWarper(top_p=float(s.s["top_p"]))])
            row = warp(hist[r:r + 1], scores[r:r + 1])
            probs = F.softmax(row, dim=-1)
            out[r] = int(torch.multinomial(probs, 1, generator=s.generator).item())
        return out

    def _advance(self, tokens: list[int], first_row: int, count: Optional[int] = None) -> None:
        """Record each row's new token, stream it, and remove the rows that are done."""
        rows = self.rows[first_row:first_row + (count if count is not None else len(tokens))]
        done = []
        for s, t in zip(rows, tokens):
            s.ids.append(t)
            n = s.s["no_repeat_ngram_size"] or 0
            seq = [PAD_ID] + s.ids
            if n > 0 and len(seq) >= n:
                s.ngrams.setdefault(tuple(seq[-n:-1]), set()).add(seq[-1])
            if s.req.presence_penalty or s.req.frequency_penalty:
                s.counts[t] = s.counts.get(t, 0) + 1
            try:
                s.streamer.put([t])
            except GenerationCancelled as e:
                done.append((s, e))
                continue
            if t == EOS_ID or len(s.ids) >= s.s["max_new_tokens"] or s.streamer.stopped:
                done.append((s, None))
        for s, err in done:
            self._finish(s, error=err)
        if done:
            self._drop({id(s) for s, _ in done})

    def _drop(self, gone: set) -> None:
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._state = None
            return
        st = self._state
        idx = torch.tensor(keep, dtype=torch.long, device=st["enc"].device)
        # columns no remaining row uses: left padding of the decoder, right padding of the encoder
        dec_mask = st["dec_mask"].index_select(0, idx)
        t0 = int((dec_mask.sum(0) == 0).long().cumprod(0).sum())
        enc_mask = st["enc_mask"].index_select(0, idx)
        s1 = int(enc_mask.sum(1).max())
        st["dec_mask"], st["hist"] = dec_mask[:, t0:], st["hist"].index_select(0, idx)[:, t0:]
        st["enc_mask"], st["enc"] = enc_mask[:, :s1], st["enc"].index_select(0, idx)[:, :s1]
        st["self"] = [(k.index_select(0, idx)[:, :, t0:], v.index_select(0, idx)[:, :, t0:]) for k, v in st["self"]]
        st["cross"] = [(k.index_select(0, idx)[:, :, :s1], v.index_select(0, idx)[:, :, :s1]) for k, v in st["cross"]]

    # ---------------------------------------------------------------------------------------- results
    def _finish(self, s: _Seq, error: Optional[BaseException] = None) -> None:
        req = s.req
        if req.future.done():
            return
        if error is not None:
            for st in req.streamers:
                st.cancel.set()  # the request's other choices stop at their next token
            self._fail_request(req, error)
            return
        s.streamer.end()
        text = s.streamer.text if s.streamer.stops else self.tokenizer.decode(
            s.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        reason = "stop" if (s.ids and s.ids[-1] == EOS_ID) or s.streamer.stopped else "length"
        req.results[s.index] = GenerationResult(text=text, ids=list(s.ids), prompt_tokens=len(req.ids),
                                                finish_reason=reason)
        req.left -= 1
        if req.left == 0:
            with self.cond:
                self.active_requests -= 1
            req.future.set_result(req.results)

    def _fail_request(self, req: _Request, error: BaseException, active: bool = True) -> None:
        if req.failed or req.future.done():
            return
        req.failed = True
        for st in req.streamers:
            if not st.ended:
                st.fail(error)
        if active:
            with self.cond:
                self.active_requests -= 1
        req.future.set_exception(error)
