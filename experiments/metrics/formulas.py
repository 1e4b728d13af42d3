"""Pure metric functions: no model, no I/O, plain numbers in and out.

CounterFact comparisons work on mean per-token NLLs (lower = more likely); probabilities are
exp(-mean NLL), the per-token geometric mean probability, as in ROME.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np


def prefers(nll_a: Sequence[float], nll_b: Sequence[float]) -> float:
    """Fraction of prompts where a is strictly more likely than b (a tie counts as failure)."""
    a, b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} vs {b.shape} NLLs")
    return float(np.mean(a < b)) if a.size else math.nan


def prob_gap(nll_a: Sequence[float], nll_b: Sequence[float]) -> float:
    """Mean of exp(-nll_a) - exp(-nll_b): the magnitude behind `prefers`."""
    a, b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    return float(np.mean(np.exp(-a) - np.exp(-b))) if a.size else math.nan


def mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Mean ignoring NaN (a case without prompts of a kind), weighted by `weights` where given;
    NaN when nothing is left."""
    weights = [1.0] * len(values) if weights is None else weights
    if len(weights) != len(values):
        raise ValueError(f"{len(weights)} weights for {len(values)} values")
    kept = [(v, w) for v, w in zip(values, weights) if not math.isnan(v)]
    return float(np.average([v for v, _ in kept], weights=[w for _, w in kept])) if kept else math.nan


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative scores; 0 when any is 0, NaN when any is NaN or none given."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean of negative values {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    p, g = _labels(predicted, gold)
    return float(np.mean(p == g)) if p.size else math.nan


def macro_f1(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in gold or predictions (as sklearn); a class
    never predicted correctly scores 0."""
    labels, scores, _ = _class_f1(predicted, gold)
    return float(np.mean(scores)) if labels.size else math.nan


def weighted_f1(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """F1 per class weighted by its count in gold (sklearn's average='weighted', AlphaEdit's GLUE
    score); a prediction outside the gold classes (e.g. -1, no answer) only costs recall."""
    labels, scores, support = _class_f1(predicted, gold)
    return float(np.sum(scores * support) / np.sum(support)) if labels.size else math.nan


def _class_f1(predicted: Sequence[int], gold: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes in gold or predictions, F1 of each, gold count of each)."""
    p, g = _labels(predicted, gold)
    labels = np.union1d(p, g)
    scores, support = [], []
    for label in labels:
        tp = np.sum((p == label) & (g == label))
        fp = np.sum((p == label) & (g != label))
        fn = np.sum((p != label) & (g == label))
        scores.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: the label occurs somewhere
        support.append(np.sum(g == label))
    return labels, np.array(scores, dtype=float), np.array(support, dtype=float)


def mcc(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, the multi-class form (Gorodkin 2004):
    (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)),
    c correct, s total, p_k / t_k predicted / true counts of class k; 0 when undefined."""
    p, g = _labels(predicted, gold)
    if not p.size:
        return math.nan
    labels = np.union1d(p, g)
    pred_counts = np.array([np.sum(p == k) for k in labels], dtype=float)
    true_counts = np.array([np.sum(g == k) for k in labels], dtype=float)
    s, c = float(p.size), float(np.sum(p == g))
    denominator = math.sqrt((s * s - pred_counts @ pred_counts) * (s * s - true_counts @ true_counts))
    return float((c * s - pred_counts @ true_counts) / denominator) if denominator > 0 else 0.0


def _labels(predicted: Sequence[int], gold: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(predicted, dtype=int), np.asarray(gold, dtype=int)
    if p.shape != g.shape:
        raise ValueError(f"{p.size} predictions for {g.size} gold labels")
    return p, g


WORD = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, close to nltk.word_tokenize


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's compute_n_gram_entropy: mean over n of weight_n * entropy (bits) of the text's
    n-gram distribution. Repetitive (degenerate) text scores low."""
    tokens = WORD.findall(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = np.array(list(Counter(zip(*(tokens[i:] for i in range(n)))).values()), dtype=float)
        freqs = counts / counts.sum() if counts.size else counts
        weighted.append(weight * float(np.sum(-freqs * np.log2(freqs))))
    return float(np.mean(weighted))
