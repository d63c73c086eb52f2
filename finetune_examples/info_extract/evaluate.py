"""Triple-extraction scoring: robust parsing of generated ``[(s,p,o),...]`` and micro P/R/F1.

Generated text is messy: brackets may be unbalanced or cut off, items padded with spaces or quotes, commas and
parentheses full-width (``（s，p，o）``), separators ``、`` or ``；``. Predicted and gold triples go through the same
canonical form (NFKC, no whitespace, lower case), so a comma inside an entity compares equal either way.

Micro P/R/F1 over per-sentence triple sets: TP = sum |pred_i & gold_i|, P = TP / sum |pred_i|,
R = TP / sum |gold_i|.

    python finetune_examples/info_extract/evaluate.py --model_dir model_save/ie --test_file data/generated/ie/dev.parquet
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pandas as pd
import torch
from rich.progress import Progress

from transformers import LogitsProcessorList

from config import EOS_ID, PAD_ID, PROJECT_ROOT
from finetune_examples.info_extract.constrained import TripleConstraint, token_pieces
from finetune_examples.info_extract.data_process import PROMPT_PREFIX, format_triples, make_prompt, read_ie_file
from model.data.checkpoint import load_model_folder

Triple = tuple[str, str, str]
_QUOTES = "'\"‘’“”「」『』`"
_SEPS = ",，、;；"


def canonical(s: str) -> str:
    """NFKC (full-width to ASCII), no whitespace, no surrounding quotes, lower case."""
    s = unicodedata.normalize("NFKC", s or "")
    s = re.sub(r"\s+", "", s)
    return s.strip(_QUOTES).lower()


def _parts(body: str) -> list[str]:
    parts = [canonical(p) for p in re.split(f"[{_SEPS}]", body)]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _split_items(body: str, predicates: Optional[set[str]] = None) -> Optional[Triple]:
    """s,p,o from the inside of one tuple.

    An entity may itself hold a comma (``(你好，旧时光,主演,李兰迪)``): with more than three fields the field
    that is a known predicate splits subject from object; without one the first two fields are s and p.
    """
    parts = _parts(body)
    if len(parts) < 3 or not all(parts[:2]):
        return None
    i = 1
    if len(parts) > 3 and predicates:
        i = next((j for j in range(1, len(parts) - 1) if parts[j] in predicates), 1)
    s, p, o = ",".join(parts[:i]), parts[i], ",".join(parts[i + 1:])
    return (s, p, o) if s and p and o else None


def _tuple_bodies(text: str) -> list[str]:
    """The insides of the round-bracket tuples in ``text`` (also a last one cut off before its ``)``)."""
    t = unicodedata.normalize("NFKC", text or "")
    # round brackets hold the triples; square ones only wrap the list
    t = t.replace("[", " ").replace("]", " ").replace("【", " ").replace("】", " ")
    bodies: list[str] = []
    depth, cur = 0, []
    for ch in t:
        if ch == "(":
            if depth == 0:
                depth, cur = 1, []
                continue
            before = "".join(cur).rstrip()
            if not before:  # "((s,p,o))"
                continue
            if before[-1] in _SEPS and len(_parts(before)) >= 3:  # "(s,p,o,(s2..." lost a ')'
                bodies.append(before)
                depth, cur = 1, []
                continue
            depth += 1  # a bracket inside an entity: "碎叶城(今托克马克)"
            cur.append(ch)
        elif ch == ")":
            if depth == 0:
                continue
            depth -= 1
            if depth == 0:
                bodies.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        elif depth:
            cur.append(ch)
    if depth and cur:
        bodies.append("".join(cur))
    if not bodies and "(" not in t and ")" not in t:  # no brackets at all: "s,p,o" per line
        bodies = [line for line in re.split(r"[\n;；]", t) if line.strip()]
    return bodies


def parse_triples(text: str, predicates: Optional[set[str]] = None) -> set[Triple]:
    """Every ``(s,p,o)`` in generated text, canonicalised; malformed pieces are ignored, never fatal."""
    return {tr for b in _tuple_bodies(text) if (tr := _split_items(b, predicates))}


def known_predicates(texts: Iterable[str]) -> set[str]:
    """Predicates seen in unambiguous (three-field) tuples: used to split fields of entities with commas."""
    return {parts[1] for t in texts for b in _tuple_bodies(t) if len(parts := _parts(b)) == 3 and parts[1]}


def micro_prf(preds: Iterable[set], golds: Iterable[set]) -> dict[str, float]:
    """Micro precision, recall and F1 over per-sentence sets (0 where a denominator is 0)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(preds, golds, strict=True):
        tp += len(set(p) & set(g))
        n_pred += len(p)
        n_gold += len(g)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "n_pred": n_pred, "n_gold": n_gold}


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """P/R/F1 of generated responses against reference responses (both in the ``[(s,p,o)]`` text format)."""
    predicates = known_predicates(references)
    preds = [parse_triples(p, predicates) for p in predictions]
    golds = [parse_triples(r, predicates) for r in references]
    out = micro_prf(preds, golds)
    out["sentences"] = len(preds)
    out["exact_match"] = sum(p == g for p, g in zip(preds, golds)) / len(preds) if preds else 0.0
    out["unparsed"] = sum(1 for p, t in zip(preds, predictions) if not p and t.strip() not in ("", "[]"))
    return out


# ---------------------------------------------------------------------------------------- generation
def source_sentence(tokenizer, ids: list[int]) -> str:
    """The sentence as the model reads it (decoded source, prompt prefix removed): spans are copied from this."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[len(PROMPT_PREFIX):] if text.startswith(PROMPT_PREFIX) else text


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 128,
                       max_source_len: int = 256, search_type: str = "greedy", progress: bool = True,
                       constrained: bool = False, predicates: Optional[Iterable[str]] = None,
                       num_beams: int = 4) -> list[str]:
    """Batched generation through ``my_generate``; prompts sorted by length so batches carry little padding.

    ``constrained`` applies ``TripleConstraint``: spans from the sentence, predicates from ``predicates`` (any
    text where None), no repeated triple.
    """
    device = next(model.parameters()).device
    model.eval()
    enc = [tokenizer(p, truncation=True, max_length=max_source_len)["input_ids"] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    pieces = token_pieces(tokenizer) if constrained else None
    beams = num_beams if search_type == "beam" else 1
    out: list[str] = [""] * len(enc)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("extracting", total=len(enc))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(enc[i])] = torch.tensor(enc[i])
            mask = (ids != PAD_ID).long()
            processors = None
            if constrained:
                processors = LogitsProcessorList([TripleConstraint(
                    [source_sentence(tokenizer, enc[i]) for i in idx], pieces, EOS_ID, predicates, beams)])
            gen = model.my_generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                    search_type=search_type, num_beams=beams, logits_processor=processors)
            for r, text in enumerate(tokenizer.batch_decode(gen, skip_special_tokens=True)):
                out[idx[r]] = text.strip()
            bar.advance(task, len(idx))
    return out


def load_test_file(test_file: str | Path, limit: Optional[int] = None) -> tuple[list[str], list[str]]:
    """(prompts, reference responses) from a prompt/response parquet or a raw DuIE/SKE file."""
    p = Path(test_file)
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
        missing = {"prompt", "response"} - set(df.columns)
        if missing:
            raise ValueError(f"{p}: missing column(s) {', '.join(sorted(missing))}")
        prompts, refs = df["prompt"].astype(str).tolist(), df["response"].astype(str).tolist()
    else:
        pairs = list(read_ie_file(p))
        prompts, refs = [make_prompt(t) for t, _ in pairs], [format_triples(tr) for _, tr in pairs]
    if limit:
        prompts, refs = prompts[:limit], refs[:limit]
    return prompts, refs


def evaluate(model_dir: str = "model_save/ie", test_file: str = "data/generated/ie/dev.parquet",
             batch_size: int = 32, max_new_tokens: int = 128, max_source_len: int = 256,
             search_type: str = "greedy", limit: Optional[int] = None, out_file: Optional[str] = None,
             num_threads: int = 2, device: str = "auto", model=None, tokenizer=None,
             progress: bool = True, constrained: bool = False, predicates_from: Optional[str] = None,
             predicates: Optional[set[str]] = None,
             num_beams: int = 4) -> dict:
    """Generate for every test prompt, parse, score; writes predictions (JSON lines) next to the model.

    ``constrained`` decodes under ``TripleConstraint``, with the predicates of ``predicates_from`` (a training
    file: parquet or raw DuIE/SKE) where given, or with ``predicates`` already read from one; the test file's own
    references never choose them.
    """
    torch.set_num_threads(max(1, num_threads))
    if model is None or tokenizer is None:
        md = Path(model_dir)
        if not md.is_absolute() and not md.exists():
            md = PROJECT_ROOT / md
        model, tokenizer = load_model_folder(md, device=device)
    prompts, refs = load_test_file(test_file, limit)
    if not prompts:
        raise ValueError(f"{test_file}: no test rows")
    if constrained and predicates is None and predicates_from:
        predicates = known_predicates(load_test_file(predicates_from)[1])
    preds = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens, max_source_len,
                               search_type, progress, constrained, predicates, num_beams)
    scores = score_texts(preds, refs)
    if out_file is None and model_dir:
        out_file = str(Path(model_dir) / "ie_predictions.jsonl")
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "w", encoding="utf-8") as f:
            for pr, pd_, rf in zip(prompts, preds, refs):
                f.write(json.dumps({"prompt": pr, "prediction": pd_, "reference": rf}, ensure_ascii=False) + "\n")
        scores["predictions_file"] = out_file
    return scores


def main(**kw):
    scores = evaluate(**kw)
    print(f"P {scores['precision']:.4f}  R {scores['recall']:.4f}  F1 {scores['f1']:.4f}  "
          f"({scores['sentences']} sentences, {scores['n_gold']} gold triples, {scores['n_pred']} predicted)")
    print(json.dumps({k: v for k, v in scores.items()}, ensure_ascii=False))


if __name__ == "__main__":
    import fire
    fire.Fire(main)
