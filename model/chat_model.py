"""The chat model: a plain T5 with the project's one generation entry point.

``TextToTextModel`` subclasses ``T5ForConditionalGeneration`` and saves plain HF T5 folders, so anyone can load
the result with ``AutoModelForSeq2SeqLM`` and no project code. Every stage, the CLI and the API generate through
``my_generate``; contrastive search is implemented here because transformers 5 moved it out of the library.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, T5ForConditionalGeneration
from transformers.generation.logits_process import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                                   RepetitionPenaltyLogitsProcessor)

from config import EOS_ID, PAD_ID
from model.chat_model_config import default_generation_config, t5_config
from model.packing import segment_masks

SEARCH_TYPES = ("greedy", "beam", "sampling", "contrastive")
IGNORE_INDEX = -100  # label positions that are not scored (padding)


class TextToTextModel(T5ForConditionalGeneration):
    """T5 encoder-decoder with ``my_generate`` (greedy, beam, sampling, contrastive; KV cache always on)."""

    @classmethod
    def from_preset(cls, preset: str = "small", vocab_size: Optional[int] = None, **overrides) -> "TextToTextModel":
        model = cls(t5_config(preset, vocab_size=vocab_size, **overrides))
        model.generation_config = default_generation_config()
        return model

    # -------------------------------------------------------------------------------------------- maths
    def target_loss(self, input_ids, attention_mask, labels, decoder_input_ids=None, source_segments=None,
                    target_segments=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of the target tokens and their count (so accumulation can weight by tokens).

        Same computation as ``forward(labels=...)``, except that the LM head and the softmax run only on the
        positions that count (padding costs nothing there) and the decoder builds no KV cache. Packed rows
        (:mod:`model.packing`) bring their segment numbers and per-example decoder inputs.
        """
        enc_mask, dec_mask, cross_mask = attention_mask, None, attention_mask
        if source_segments is not None:
            enc_mask, dec_mask, cross_mask = segment_masks(source_segments, target_segments, self.dtype)
        if decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        enc = self.encoder(input_ids=input_ids, attention_mask=enc_mask, return_dict=True).last_hidden_state
        h = self.decoder(input_ids=decoder_input_ids, attention_mask=dec_mask, encoder_hidden_states=enc,
                         encoder_attention_mask=cross_mask, use_cache=False, return_dict=True).last_hidden_state
        if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
            h = h * (self.model_dim ** -0.5)
        keep = labels != IGNORE_INDEX
        logits = self.lm_head(h[keep])
        return F.cross_entropy(_at_least_fp32(logits), labels[keep], reduction="sum"), keep.sum()

    def pair_logps(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (sums over target tokens) and token counts of ``2B`` responses given ``B`` prompts.

        ``labels`` holds the chosen responses in its first B rows and the rejected ones in the last B: the
        encoder runs once on the prompts and its output serves both halves (what DPO needs).
        """
        bsz = input_ids.shape[0]
        if labels.shape[0] != 2 * bsz:
            raise ValueError(f"labels must have 2 x batch rows (chosen then rejected), got {labels.shape[0]} "
                             f"for a batch of {bsz}")
        enc = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        out = self(encoder_outputs=(enc.last_hidden_state.repeat(2, 1, 1),), attention_mask=attention_mask.repeat(2, 1),
                   decoder_input_ids=self._shift_right(labels), use_cache=False, return_dict=True)
        return sequence_logps(out.logits, labels)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters in two groups: matrices decay, vectors (layer norms) do not."""
        return optimizer_groups(self, weight_decay)

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain T5 folder: ``architectures`` names the transformers class, not ours."""
        if self.generation_config is None or self.generation_config.decoder_start_token_id is None:
            self.generation_config = default_generation_config()
        out = super().save_pretrained(save_directory, *args, **kwargs)
        cfg_path = Path(save_directory) / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg["architectures"] = ["T5ForConditionalGeneration"]
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    # -------------------------------------------------------------------------------------- generation
    def generation_kwargs(self, search_type: str, max_new_tokens: int, **kw) -> GenerationConfig:
        """The GenerationConfig for a search type; unknown types are an error naming the valid ones."""
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"unknown search_type {search_type!r}; expected one of {', '.join(SEARCH_TYPES)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        base = dict(max_new_tokens=max_new_tokens, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                    decoder_start_token_id=PAD_ID, use_cache=True,
                    repetition_penalty=kw.get("repetition_penalty") or 1.0,
                    no_repeat_ngram_size=kw.get("no_repeat_ngram_size") or 0)
        if search_type == "greedy":
            base.update(do_sample=False, num_beams=1)
        elif search_type == "beam":
            base.update(do_sample=False, num_beams=kw.get("num_beams", 4), early_stopping=True)
        elif search_type == "sampling":
            base.update(do_sample=True, num_beams=1, temperature=kw.get("temperature", 0.9),
                        top_k=kw.get("top_k", 50), top_p=kw.get("top_p", 0.95))
        return GenerationConfig(**base)

    @torch.no_grad()
    def my_generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    max_new_tokens: int = 256, search_type: str = "greedy", streamer=None,
                    logits_processor=None, **kwargs) -> torch.Tensor:
        """Generate responses; returns decoder ids starting with the decoder start token (``[PAD]``).

        ``streamer`` (e.g. ``TextIteratorStreamer``) receives tokens as they are produced; use one per request.
        Extra kwargs: ``num_beams``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``penalty_alpha`` and ``contrastive_top_k`` (contrastive search).
        ``logits_processor`` (a ``LogitsProcessorList``) masks or reweights tokens in greedy, beam and sampling
        search, e.g. the triple-extraction constraint.
        """
        if "max_seq_len" in kwargs:  # its name in the reference project, where it also meant new tokens
            raise TypeError("my_generate takes max_new_tokens (tokens to generate), not max_seq_len")
        gen_cfg = self.generation_kwargs(search_type, max_new_tokens, **kwargs)
        if attention_mask is None:
            attention_mask = (input_ids != PAD_ID).long()
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError("streaming supports one prompt at a time (batch size 1)")
        if search_type == "contrastive":
            if logits_processor:
                raise ValueError("logits_processor works with greedy, beam and sampling search, not contrastive")
            return self._contrastive_search(
                input_ids, attention_mask, max_new_tokens=max_new_tokens,
                penalty_alpha=kwargs.get("penalty_alpha", 0.6), top_k=kwargs.get("contrastive_top_k", 4),
                repetition_penalty=kwargs.get("repetition_penalty") or 1.0,
                no_repeat_ngram_size=kwargs.get("no_repeat_ngram_size") or 0, streamer=streamer)
        if search_type == "beam" and streamer is not None:
            # transformers cannot stream beams (the best beam is known only at the end): stream the result.
            out = self.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                                logits_processor=logits_processor)
            streamer.put(out[:, :1].cpu())
            for t in out[0, 1:]:
                streamer.put(t.view(1).cpu())
            streamer.end()
            return out
        return self.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                             streamer=streamer, logits_processor=logits_processor)

    def _contrastive_search(self, input_ids, attention_mask, max_new_tokens: int, penalty_alpha: float,
                            top_k: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                            streamer=None) -> torch.Tensor:
        """Contrastive search (Su et al. 2022) with the KV cache.

        Each step scores the top-k candidates by ``(1 - alpha) * p(v) - alpha * max cos(h_v, h_<t)`` where ``h``
        are the decoder's last hidden states; the k candidates are run in one batched decoder step over a copy of
        the cache, and the cache of the chosen candidate is kept.
        """
        device = input_ids.device
        bsz = input_ids.shape[0]
        enc = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        dec = torch.full((bsz, 1), PAD_ID, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(dec.cpu())
        out = self(encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=dec, use_cache=True,
                   output_hidden_states=True, return_dict=True)
        cache = out.cache
        context_h = out.decoder_hidden_states[-1]  # (B, t, d)
        logits = out.logits[:, -1, :]
        processors = LogitsProcessorList()
        if repetition_penalty and repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if no_repeat_ngram_size and no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        enc_h_k = enc.last_hidden_state.repeat_interleave(top_k, dim=0)
        mask_k = attention_mask.repeat_interleave(top_k, dim=0)
        for _ in range(max_new_tokens):
            scores = processors(dec, logits.float())
            probs = F.softmax(scores, dim=-1)
            top_p, top_ids = probs.topk(top_k, dim=-1)  # (B, k)
            cand_cache = _copy_cache(cache)
            cand_cache.batch_repeat_interleave(top_k)
            cand = self(encoder_outputs=(enc_h_k,), attention_mask=mask_k, decoder_input_ids=top_ids.reshape(-1, 1),
                        cache=cand_cache, use_cache=True, output_hidden_states=True, return_dict=True)
            cand_h = cand.decoder_hidden_states[-1][:, -1, :].reshape(bsz, top_k, -1)  # (B, k, d)
            sim = F.cosine_similarity(cand_h.unsqueeze(2), context_h.unsqueeze(1), dim=-1)  # (B, k, t)
            degeneration = sim.max(dim=-1).values
            score = (1.0 - penalty_alpha) * top_p - penalty_alpha * degeneration
            best = score.argmax(dim=-1)  # (B,)
            next_tok = top_ids.gather(1, best.unsqueeze(1)).squeeze(1)
            next_tok = torch.where(finished, torch.full_like(next_tok, PAD_ID), next_tok)
            select = torch.arange(bsz, device=device) * top_k + best
            cand.cache.batch_select_indices(select)
            cache = cand.cache
            logits = cand.logits[:, -1, :].reshape(bsz, top_k, -1)[torch.arange(bsz, device=device), best]
            context_h = torch.cat([context_h, cand_h[torch.arange(bsz, device=device), best].unsqueeze(1)], dim=1)
            dec = torch.cat([dec, next_tok.unsqueeze(1)], dim=1)
            if streamer is not None:
                streamer.put(next_tok.cpu())
            finished |= next_tok == EOS_ID
            if finished.all():
                break
        if streamer is not None:
            streamer.end()
        return dec


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits go up to fp32 for the softmax; float64 (tests) stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def optimizer_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (any module: the rule is the same)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over the scored positions of each row, and their count (in fp32)."""
    mask = labels != IGNORE_INDEX
    logits = _at_least_fp32(logits)
    tok = torch.gather(logits, 2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2) - torch.logsumexp(logits, -1)
    return (tok * mask).sum(-1), mask.sum(-1)


def _copy_cache(cache):
    """A deep copy of an encoder-decoder KV cache (tensors cloned), so candidates do not write into it."""
    import copy
    return copy.deepcopy(cache)
