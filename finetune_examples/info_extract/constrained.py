"""Constrained extraction: every generated subject and object is a span of the sentence, every predicate one the
training data knows, the output keeps the ``[(s,p,o),...]`` form, and a repeated triple ends the list.

A small model that has learned to copy still slips: a span one character too long, a predicate spelled half
from memory, a triple repeated until the length limit eats the ones after it. A model that writes a triple a second time has
run out of new ones (forbidding the repeat instead makes it stretch a span until the triple differs), so the
list closes there and the repeat is dropped when parsed into a set. Masking the tokens that would
break those rules lets greedy (or beam) search pick the best token that keeps them, so the model's ranking
still decides every choice. The rules work on characters, so they hold whatever the tokenizer merged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from transformers import LogitsProcessor

STRUCTURE = "[](),"
START, OPEN, FIELD, CLOSED, REPEATED, END = range(6)


@dataclass
class Grammar:
    """The rules for one sentence: where a field may go next, character by character."""

    sentence: str
    predicates: Optional[frozenset[str]] = None  # None: any predicate text
    predicate_prefixes: frozenset[str] = field(init=False)

    def __post_init__(self):
        self.predicate_prefixes = frozenset(p[:i] for p in self.predicates or () for i in range(1, len(p) + 1))

    def span_ok(self, k: int, text: str) -> bool:
        """A partial field: subject and object grow inside the sentence, the predicate towards a known one."""
        if k == 1:
            return self.predicates is None or text in self.predicate_prefixes
        return text in self.sentence

    def field_done(self, k: int, text: str) -> bool:
        if not text:
            return False
        return k != 1 or self.predicates is None or text in self.predicates


@dataclass
class State:
    """Where the output stands: the part of the grammar, the field being written and the triples so far."""

    part: int = START
    k: int = 0
    fields: tuple[str, ...] = ()
    buf: str = ""
    triples: frozenset = frozenset()

    def step(self, ch: str, g: Grammar) -> Optional["State"]:
        """The state after one more character, or None where the character breaks a rule."""
        p = self.part
        if p == START:
            return State(OPEN, triples=self.triples) if ch == "[" else None
        if p == OPEN:
            if ch == "(":
                return State(FIELD, 0, (), "", self.triples)
            return State(END, triples=self.triples) if ch == "]" and not self.triples else None
        if p == REPEATED:
            return State(END, triples=self.triples) if ch == "]" else None
        if p == CLOSED:
            if ch == ",":
                return State(OPEN, triples=self.triples)
            return State(END, triples=self.triples) if ch == "]" else None
        if p == END:
            return None
        # inside a field
        if ch == "," and self.k < 2:
            if not g.field_done(self.k, self.buf):
                return None
            return State(FIELD, self.k + 1, self.fields + (self.buf,), "", self.triples)
        if ch == ")" and self.k == 2:
            triple = self.fields + (self.buf,)
            if not g.field_done(2, self.buf):
                return None
            return State(REPEATED if triple in self.triples else CLOSED, triples=self.triples | {triple})
        if ch in STRUCTURE:
            return None
        buf = self.buf + ch
        return State(FIELD, self.k, self.fields, buf, self.triples) if g.span_ok(self.k, buf) else None

    def after(self, text: str, g: Grammar) -> Optional["State"]:
        s: Optional[State] = self
        for ch in text:
            s = s.step(ch, g)
            if s is None:
                return None
        return s


class TripleConstraint(LogitsProcessor):
    """A logits processor that masks every token breaking the grammar of each row's sentence.

    ``pieces`` is each token's text (``""`` for special tokens); the end token is allowed only once the list is
    closed, and a row whose every token is masked may still end, so generation never stalls.
    """

    def __init__(self, sentences: Sequence[str], pieces: Sequence[str], eos_id: int,
                 predicates: Optional[Iterable[str]] = None, num_beams: int = 1):
        preds = frozenset(predicates) if predicates is not None else None
        self.grammars = [Grammar(s, preds) for s in sentences]
        self.pieces, self.eos_id, self.num_beams = list(pieces), eos_id, num_beams
        ids = [i for i, p in enumerate(self.pieces) if p]
        self.structural = [i for i in ids if any(c in STRUCTURE for c in self.pieces[i])]
        plain = [i for i in ids if not any(c in STRUCTURE for c in self.pieces[i])]
        joined = "\x00".join(preds) if preds is not None else None
        self.predicate_ids = plain if joined is None else [i for i in plain if self.pieces[i] in joined]
        self.span_ids = [[i for i in plain if self.pieces[i] in g.sentence] for g in self.grammars]
        self.states: dict[tuple[int, tuple[int, ...]], State] = {}

    def _state(self, row: int, ids: tuple[int, ...]) -> Optional[State]:
        """The state after ``ids`` (cached by prefix: each step extends a cached one by a token)."""
        key = (row, ids)
        if key not in self.states:
            prev = self._state(row, ids[:-1]) if ids else State()
            self.states[key] = prev.after(self.pieces[ids[-1]], self.grammars[row]) if ids and prev else prev
        return self.states[key]

    def allowed(self, row: int, ids: tuple[int, ...]) -> list[int]:
        state = self._state(row, ids)
        if state is None:
            return [self.eos_id]
        if state.part == END:
            return [self.eos_id]
        g = self.grammars[row]
        candidates = self.structural
        if state.part == FIELD:
            candidates = candidates + (self.predicate_ids if state.k == 1 else self.span_ids[row])
        out = [i for i in candidates if state.after(self.pieces[i], g) is not None]
        return out or [self.eos_id]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for b, seq in enumerate(input_ids.tolist()):
            # the decoder's first id is its start token; specials (empty pieces) carry no text
            ids = tuple(t for t in seq[1:] if self.pieces[t])
            mask[b, self.allowed(b // self.num_beams, ids)] = 0.0
        return scores + mask


def token_pieces(tokenizer) -> list[str]:
    """Each token id's text, ``""`` for special tokens (they carry no characters of the answer)."""
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]
