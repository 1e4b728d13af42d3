"""Metric functions against hand-computed values."""
from __future__ import annotations

import math

import pytest

from experiments.metrics.formulas import accuracy, harmonic_mean, macro_f1, mcc, mean, ngram_entropy, prefers, prob_gap


def test_prefers_and_prob_gap():
    new, true = [0.5, 2.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.1]
    assert prefers(new, true) == 0.25  # only 0.5 < 1.0; the tie 1.0 vs 1.0 fails
    expected = sum(math.exp(-a) - math.exp(-b) for a, b in zip(new, true)) / 4
    assert prob_gap(new, true) == pytest.approx(expected)
    assert math.isnan(prefers([], []))
    with pytest.raises(ValueError):
        prefers([1.0], [1.0, 2.0])


def test_harmonic_mean():
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / (2 + 1 + 1))
    assert harmonic_mean([1.0, 0.0, 0.9]) == 0.0
    assert math.isnan(harmonic_mean([1.0, math.nan]))
    assert math.isnan(harmonic_mean([]))
    assert math.isnan(mean([math.nan])) and mean([1.0, math.nan, 3.0]) == 2.0


def test_binary_classification_metrics():
    predicted, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # TP 2, FP 1, TN 1, FN 1
    assert accuracy(predicted, gold) == pytest.approx(3 / 5)
    assert mcc(predicted, gold) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    f1_pos, f1_neg = 2 * 2 / (2 * 2 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1)
    assert macro_f1(predicted, gold) == pytest.approx((f1_pos + f1_neg) / 2)


def test_multiclass_metrics():
    predicted, gold = [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 0, 0]
    # c = 4 correct of s = 6; predicted counts (2, 2, 2), true counts (3, 2, 1)
    assert mcc(predicted, gold) == pytest.approx((4 * 6 - 12) / math.sqrt((36 - 12) * (36 - 14)))
    assert macro_f1(predicted, gold) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)


def test_degenerate_classification():
    assert mcc([1, 1, 1], [1, 0, 1]) == 0.0  # one predicted class: undefined -> 0
    assert mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert macro_f1([0, 0], [1, 1]) == 0.0


def test_ngram_entropy_hand_example():
    # tokens a b a b: bigrams ab x2, ba x1 -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # fully repetitive
    assert ngram_entropy("x") == 0.0
    # punctuation is its own token: "a, b" -> a , b
    assert ngram_entropy("a, b") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
