"""Generation: left-padded batches equal one-prompt generation; TF-IDF and fluency by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data.records import CaseRecord
from experiments.metrics.formulas import ngram_entropy
from experiments.metrics.generation import TfIdf, evaluate_generation, generate, left_pad, summarize_generation
from util.requests import EditRequest

PROMPTS = ["The", "Porsche 911 is my favorite product out of everything created by", "In 1990, the city of"]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_one_by_one(tiny):
    batched = generate(tiny, PROMPTS, max_new_tokens=8, top_k=None, batch_size=3)
    single = [generate(tiny, [p], max_new_tokens=8, top_k=None)[0] for p in PROMPTS]
    assert batched == single
    assert all(text for text in batched)


def test_sampling_is_seeded_and_leaves_global_rng(tiny_llama):
    state = torch.random.get_rng_state()
    a = generate(tiny_llama, PROMPTS, max_new_tokens=6, top_k=5, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == generate(tiny_llama, PROMPTS, max_new_tokens=6, top_k=5, seed=3)
    assert a != generate(tiny_llama, PROMPTS, max_new_tokens=6, top_k=5, seed=4)


CORPUS = ["the cat sat on the mat", "the dog sat", "a bird flew over the house"]


def test_tfidf_by_hand(tmp_path):
    vec = TfIdf.fit(CORPUS)
    n = 3
    idf = {t: math.log((1 + n) / (1 + df)) + 1 for t, df in [("the", 3), ("cat", 1), ("sat", 2), ("dog", 1)]}
    # "the cat the" -> tf: the 2, cat 1; "a" is dropped by the 2+ character token pattern
    v = vec.vector("The cat the a")
    raw = {"the": 2 * idf["the"], "cat": idf["cat"]}
    norm = math.sqrt(sum(x * x for x in raw.values()))
    assert {t: v[vec.vocab[t]] for t in raw} == pytest.approx({t: x / norm for t, x in raw.items()})
    a, b = "the cat sat", "the dog sat"
    va = np.array([idf["the"], idf["cat"], idf["sat"], 0.0])
    vb = np.array([idf["the"], 0.0, idf["sat"], idf["dog"]])
    assert vec.similarity(a, b) == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert vec.similarity(a, a) == pytest.approx(1.0)
    assert vec.similarity("cat", "dog") == 0.0 and vec.similarity("zebra", "cat") == 0.0
    vec.save(tmp_path / "tfidf.json")
    loaded = TfIdf.load(tmp_path / "tfidf.json")
    assert loaded.vocab == vec.vocab and np.array_equal(loaded.idf, vec.idf)


def test_tfidf_vocabulary_limits():
    assert set(TfIdf.fit(CORPUS, min_df=2).vocab) == {"the", "sat"}
    assert set(TfIdf.fit(CORPUS, max_features=1).vocab) == {"the"}


def test_evaluate_generation(tiny_gpt2):
    record = CaseRecord(
        EditRequest("{}, created by", "Porsche 911", "Honda", "Porsche", case_id=18),
        attribute_prompts=("Honda Aviator is produced by", "Honda Passport is created by"),
        generation_prompts=PROMPTS[:2],
    )
    bare = CaseRecord(EditRequest("{} is in", "Paris", "Rome", case_id=2))
    vec = TfIdf.fit(CORPUS + ["Honda produced the Aviator and the Passport"])
    results = evaluate_generation(tiny_gpt2, [record, bare], vec, max_new_tokens=5, top_k=None)
    first = results[0]
    assert [t[: len(p)] for t, p in zip(first.texts, PROMPTS)] == PROMPTS[:2]
    assert first.fluency == pytest.approx(np.mean([ngram_entropy(t) for t in first.texts]))
    assert first.consistency == pytest.approx(vec.similarity(" ".join(first.texts), " ".join(record.attribute_prompts)))
    assert results[1].texts == () and results[1].fluency is None and results[1].consistency is None
    summary = summarize_generation(results)
    assert summary["fluency"] == pytest.approx(first.fluency)
    json.dumps([r.to_dict() for r in results] + [summary], allow_nan=False)
