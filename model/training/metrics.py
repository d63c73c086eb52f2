"""Evaluation metrics shared by the trainers: character BLEU over the whole sample, perplexity.

BLEU is scored by sacrebleu over the whole corpus of generated answers at once (a mean of per-batch scores is
not corpus BLEU), on characters: Chinese has no spaces to split words on.
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
