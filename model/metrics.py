"""Evaluation metrics shared by the trainers: character BLEU over the whole sample, perplexity.

The reference kept only the last batch's BLEU and computed its own brevity penalty wrongly; here sacrebleu scores
the whole corpus of generated answers at once, on characters (Chinese has no spaces to split words on).
"""
from __future__ import annotations

import math
from typing import Sequence


def char_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) on characters, with sacrebleu's standard brevity penalty."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="char").score)


def perplexity(mean_loss: float) -> float:
    """exp(loss), capped so a diverged run reports a huge number instead of overflowing."""
    return float(math.exp(min(mean_loss, 50.0)))


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of answers equal to the reference after stripping spaces."""
    if not hypotheses:
        return 0.0
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(hypotheses)
