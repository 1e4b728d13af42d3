"""r-ROME on the embedded model with real CounterFact records (slow: ~15 s per edit with bfloat16
values on a CPU with native bfloat16, ~27 s in float32 on one with AVX2 alone)."""
import pytest
import torch

from data.cases import load_cases
from editors import ALGORITHMS, load_algorithm_hparams
from experiments.metrics.counterfact import evaluate_cases, summarize
from rome.editor import EditContext
from util.deltas import restore

N_RECORDS = 3


@pytest.mark.slow
def test_r_rome_makes_each_target_the_argmax_of_its_prompt(embedded, shared_data, embedded_caches):
    hparams = load_algorithm_hparams("R-ROME", "smollm2-135m.yaml")
    ctx = EditContext(embedded_caches, seed=0, corpus_path=str(shared_data / "wiki"))
    records = load_cases("cf", shared_data, limit=N_RECORDS)
    results = []
    for record in records:
        edit = ALGORITHMS["R-ROME"].apply(embedded, [record.request], hparams, ctx)
        results.extend(evaluate_cases(embedded, [record]))
        restore(embedded.model, edit.originals)
    efficacy = [r.rewrite[0].argmax for r in results]
    scores = summarize(results)
    print(f"\nR-ROME on smollm2-135m, {N_RECORDS} CounterFact records: efficacy (argmax) {sum(efficacy)}/{N_RECORDS}, "
          f"ES {scores['ES']:.2f} PS {scores['PS']:.2f} NS {scores['NS']:.2f}, paraphrase argmax {scores['paraphrase_acc']:.2f}")
    assert all(efficacy), [r.case_id for r, ok in zip(results, efficacy) if not ok]
    # Restoring the originals after each edit leaves the model as it was.
    baseline = evaluate_cases(embedded, records[:1])[0]
    assert not baseline.rewrite[0].argmax
