"""CounterFact evaluation: hand-made scores aggregate as defined; model scores match full logits."""
from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch

from data.records import CaseRecord
from experiments.metrics.counterfact import CaseResult, PromptScore, evaluate_cases, retention_summary, stratified_weights, summarize
from util.requests import EditRequest
from util.tokens import encode_with_target


def score(nll_new, nll_true, argmax=False) -> PromptScore:
    return PromptScore("p", nll_new, nll_true, argmax)


def test_case_metrics_by_hand():
    case = CaseResult(
        case_id=1,
        rewrite=(score(0.5, 1.0, True),),
        paraphrase=(score(2.0, 1.0), score(0.1, 0.2, True)),
        neighborhood=(score(1.0, 0.5, True), score(0.5, 1.0), score(3.0, 0.2, True)),
    )
    m = case.metrics()
    assert m["rewrite_success"] == 1.0 and m["paraphrase_success"] == 0.5
    assert m["neighborhood_success"] == pytest.approx(2 / 3)  # true more likely in 2 of 3
    assert m["rewrite_magnitude"] == pytest.approx(math.exp(-0.5) - math.exp(-1.0))
    gaps = [math.exp(-0.5) - math.exp(-1.0), math.exp(-1.0) - math.exp(-0.5), math.exp(-0.2) - math.exp(-3.0)]
    assert m["neighborhood_magnitude"] == pytest.approx(sum(gaps) / 3)  # p_true - p_new
    assert m["paraphrase_acc"] == 0.5 and m["neighborhood_acc"] == pytest.approx(2 / 3)


def test_summary_by_hand():
    good = CaseResult(1, (score(0.1, 1.0),), (score(0.1, 1.0), score(0.1, 1.0)), (score(1.0, 0.1),))
    half = CaseResult(2, (score(1.0, 0.1),), (score(0.1, 1.0), score(1.0, 0.1)), (score(0.1, 1.0),))
    s = summarize([good, half])
    assert (s["ES"], s["PS"], s["NS"]) == (0.5, 0.75, 0.5)
    assert s["S"] == pytest.approx(3 / (2 + 4 / 3 + 2))
    assert s["n_cases"] == 2
    json.dumps(s, allow_nan=False)


def test_accuracy_only_without_true_answer():
    case = CaseResult(3, (score(0.3, None, True),), (), (score(None, 0.2, False),))
    m = case.metrics()
    assert math.isnan(m["rewrite_success"]) and math.isnan(m["paraphrase_acc"])
    assert m["rewrite_acc"] == 1.0 and m["neighborhood_acc"] == 0.0
    s = summarize([case])
    assert s["ES"] is None and s["S"] is None and s["rewrite_acc"] == 1.0
    json.dumps(case.to_dict(), allow_nan=False)


def reference_nll(lm, prompt: str, target: str) -> tuple[float, bool]:
    ids, start = encode_with_target(lm.tok, prompt, target)
    logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), dim=-1)
    positions = range(start, len(ids))
    nll = -sum(float(logprobs[i - 1, ids[i]]) for i in positions) / len(positions)
    return nll, all(int(logprobs[i - 1].argmax()) == ids[i] for i in positions)


RECORDS = [
    CaseRecord(
        EditRequest("{}, created by", "Porsche 911", "Honda", "Porsche", case_id=18),
        paraphrase_prompts=("Porsche 911 is developed by", "The maker of the Porsche 911 is"),
        neighborhood=(("Porsche 550, developed by", "Porsche"), ("Porsche 924 is produced by", "Porsche")),
    ),
    CaseRecord(  # zsRE-like: no true answer
        EditRequest("What is the capital of {}?", "Atlantis", "Poseidonia", case_id="z1"),
        paraphrase_prompts=("Atlantis has its capital in",),
        neighborhood=(("nq question: who wrote hamlet", "William Shakespeare"),),
    ),
]


def test_scores_match_full_logits(tiny):
    results = evaluate_cases(tiny, RECORDS, batch_size=3)
    assert [r.case_id for r in results] == [18, "z1"]
    for record, result in zip(RECORDS, results):
        request = record.request
        sections = {"rewrite": [request.text], "paraphrase": list(record.paraphrase_prompts)}
        for section, prompts in sections.items():
            for prompt, got in zip(prompts, getattr(result, section), strict=True):
                nll_new, argmax_new = reference_nll(tiny, prompt, request.target_new)
                assert got.nll_new == pytest.approx(nll_new, abs=1e-5) and got.argmax == argmax_new
                if request.target_true is None:
                    assert got.nll_true is None
                else:
                    assert got.nll_true == pytest.approx(reference_nll(tiny, prompt, request.target_true)[0], abs=1e-5)
        for (prompt, answer), got in zip(record.neighborhood, result.neighborhood, strict=True):
            nll_answer, argmax_answer = reference_nll(tiny, prompt, answer)
            assert got.nll_true == pytest.approx(nll_answer, abs=1e-5) and got.argmax == argmax_answer
            if request.target_true is None:
                assert got.nll_new is None
            else:
                assert got.nll_new == pytest.approx(reference_nll(tiny, prompt, request.target_new)[0], abs=1e-5)
    json.dumps([r.to_dict() for r in results], allow_nan=False)
    json.dumps(summarize(results), allow_nan=False)


@pytest.mark.slow
def test_embedded_model_prefers_true_facts(embedded, shared_data):
    """The unedited 135M model on real CounterFact records: batched scores equal the
    one-prompt-at-a-time path, and it prefers true answers well above chance."""
    from data.cases import load_cases

    records = load_cases("cf", data_dir=shared_data, limit=20)
    results = evaluate_cases(embedded, records)
    first = results[0].rewrite[0]
    assert first.nll_new == pytest.approx(reference_nll(embedded, records[0].request.text, records[0].request.target_new)[0], abs=1e-4)
    summary = summarize(results)
    assert summary["ES"] < 0.5 and summary["NS"] > 0.5  # before editing, target_true is usually more likely


def test_stratified_weights_estimate_the_mean_over_every_fact_without_bias():
    """Retention scores every fact of the latest batch and a sample of the earlier ones: weighted
    by stratified_weights, the mean over the scored facts, averaged over every possible sample,
    is the mean over all facts in the model (a plain mean is not: it overweights the latest batch)."""
    scores = {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0, 6: 1.0, 7: 1.0}  # 6, 7: the latest batch
    latest, everything = {6, 7}, sum(scores.values()) / len(scores)
    estimates, plain = [], []
    for sample in combinations(range(6), 2):
        ids = [*sample, 6, 7]
        weights = stratified_weights(ids, latest, len(scores))
        assert weights == [3.0, 3.0, 1.0, 1.0]  # each sampled earlier fact stands for 6 / 2 of them
        estimates.append(retention_summary([{"rewrite_success": scores[c]} for c in ids], ids, latest, len(scores))["rewrite_success"])
        plain.append(sum(scores[c] for c in ids) / len(ids))
    assert sum(estimates) / len(estimates) == pytest.approx(everything)
    assert sum(plain) / len(plain) > everything + 0.1
    assert stratified_weights(list(scores), latest, len(scores)) is None  # every fact scored: a plain mean
    assert stratified_weights([6, 7], latest, len(scores)) is None  # no earlier fact sampled yet
    summary = retention_summary([{"rewrite_success": 1.0}, {"rewrite_success": 0.0}], [0, 6], latest, 3)
    assert summary["estimate"] == "stratified" and summary["latest_facts"] == 1
