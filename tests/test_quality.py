"""Bits per character and the character baselines: values computed by hand on tiny texts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from model.quality import END, START, UNSEEN, CharNgramBaselines, bits_per_char

# Training text "aab" and "ab": symbols a:3, b:2, END:2 (7 predictions), alphabet 3 + the unseen symbol = 4.
# Pairs: (S,a)x2 (a,a)x1 (a,b)x2 (b,E)x2 -> one bigram seen once, three seen twice: d = 1 / (1 + 2*3) = 1/7.
# Continuation counts: a follows {S, a}, b follows {a}, END follows {b}: lower(a) = 3/8, lower(b) = lower(E) = 2/8,
# lower(unseen) = 1/8 (add-one over 4 distinct pairs and 4 symbols).
TRAIN = ["aab", "ab"]
D = 1 / 7


def test_unigram_is_add_one_over_the_alphabet_end_and_unseen():
    m = CharNgramBaselines(TRAIN)
    got = m.nll_bits(["ab"])
    want = -math.log2(4 / 11) - math.log2(3 / 11) - math.log2(3 / 11)  # (count + 1) / (7 + 4)
    assert got["unigram_bits"] == pytest.approx(want, rel=1e-12)  # float64 sums of three logs
    assert got["chars"] == 2


def test_bigram_is_interpolated_kneser_ney_with_neys_discount():
    m = CharNgramBaselines(TRAIN)
    assert m.discount == pytest.approx(D, rel=1e-12)
    p_a = (2 - D) / 2 + D * 1 / 2 * 3 / 8  # context S: c=2, one type
    p_b = (2 - D) / 3 + D * 2 / 3 * 2 / 8  # context a: c=3, two types
    p_e = (2 - D) / 2 + D * 1 / 2 * 2 / 8  # context b: c=2, one type
    got = m.bpc(["ab"])
    assert got["bigram_bpc"] == pytest.approx(-(math.log2(p_a) + math.log2(p_b) + math.log2(p_e)) / 2, rel=1e-12)
    # an unseen character: the unseen symbol from context S, then END from an unseen context (lower order only)
    p_c = 0 + D * 1 / 2 * 1 / 8
    assert m.nll_bits(["c"])["bigram_bits"] == pytest.approx(-math.log2(p_c) - math.log2(2 / 8), rel=1e-12)


def test_bigram_distributions_sum_to_one_in_every_context():
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("天地人和风雨。"), size=rng.integers(1, 30))) for _ in range(200)]
    m = CharNgramBaselines(texts)
    symbols = list(m.alphabet) + [UNSEEN]
    for ctx in list(m.ctx) + [UNSEEN]:
        c = np.full(len(symbols), ctx, dtype=np.int64)
        s = np.array(symbols, dtype=np.int64)
        from model import quality as q
        c_vw = q._lookup(m.pairs, m.pair_counts, c * q._BASE + s).astype(float)
        c_v = q._lookup(m.ctx, m.ctx_counts, c).astype(float)
        t_v = q._lookup(m.ctx, m.ctx_types, c).astype(float)
        lower = (q._lookup(m.cont, m.cont_counts, s) + 1.0) / (m.cont_total + m.vocab)
        p = np.where(c_v > 0, np.maximum(c_vw - m.discount, 0) / np.maximum(c_v, 1)
                     + m.discount * t_v / np.maximum(c_v, 1) * lower, lower)
        assert p.sum() == pytest.approx(1.0, abs=1e-12 * len(symbols))  # float64 round-off per term
    assert START not in set(m.alphabet) and END in set(m.alphabet)


def test_bigram_beats_unigram_on_text_with_structure():
    train = ["我们是学生。我们爱学习。"] * 20 + ["他们是老师。他们爱教书。"] * 20
    r = CharNgramBaselines(train).bpc(["我们是老师。", "他们爱学习。"])
    assert r["bigram_bpc"] < r["unigram_bpc"]


def test_bits_per_char():
    assert bits_per_char(math.log(2) * 12, 6) == pytest.approx(2.0, rel=1e-15)
    assert bits_per_char(1.0, 0) == float("inf")
    with pytest.raises(ValueError, match="no training text"):
        CharNgramBaselines(["", ""])


def test_degenerate_answers_and_distinct_2():
    from model.quality import distinct_n, is_degenerate, top_token_share
    assert top_token_share([5, 5, 5, 7]) == 0.75 and is_degenerate([5, 5, 5, 7])
    assert top_token_share([1, 2, 3, 4, 5, 6, 7, 8, 9, 9]) == 0.2 and not is_degenerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    assert not is_degenerate([1, 2, 3, 4]) and is_degenerate([1, 2, 3]) and top_token_share([]) == 0.0  # 1/3 > 0.3
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[1, 1, 1, 1]], 2) == 1 / 3 and distinct_n([[1]], 2) == 0.0


def test_power_law_fit_recovers_a_known_curve_and_extrapolates():
    """bench_recipe's extrapolation: y = 7 + 3 x^-0.5 sampled exactly is recovered (c is on the fit's 0.005 grid)."""
    import json
    from pathlib import Path

    from bench.bench_recipe import extrapolate, power_law_fit
    xs = np.array([100, 200, 400, 800, 1600], dtype=float)
    fit = power_law_fit(xs, 7 + 3 * xs ** -0.5)
    assert fit["c"] == pytest.approx(0.5, abs=1e-9) and fit["a"] == pytest.approx(7, abs=1e-9)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "metrics.jsonl"
        m.write_text("".join(json.dumps({"step": int(x), "eval_bpc": 7 + 3 * x ** -0.5}) + "\n" for x in xs))
        out = extrapolate(str(m), target_bpc=7.03)  # 3 x^-0.5 = 0.03 at x = 10,000
        assert out["steps_to_target"] == pytest.approx(10_000, rel=1e-6)
        assert "steps_to_target" not in extrapolate(str(m), target_bpc=6.9)  # below the fitted floor: never
