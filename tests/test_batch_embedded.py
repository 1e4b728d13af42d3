"""MEMIT and EMMET on the embedded model with one batch of real CounterFact records (slow).

CI edits 16 records per algorithm (8 where values run in float32) to keep the suite short; the issue's batch of 64 is the same test
with KEDIT_BATCH_RECORDS=64 (about 7 minutes per algorithm on 2 cores; README has the figures).
Values are optimised in bfloat16 (mixed precision) on a CPU with native bfloat16 matmuls, else in
float32 (emulated bfloat16 is many times slower than float32: minutes per request).
"""
import os

import pytest
import torch

from data.cases import load_cases
from editors import ALGORITHMS, load_algorithm_hparams
from experiments.metrics.counterfact import evaluate_cases, summarize
from rome.editor import EditContext
from util.deltas import restore
from util.stats import fast_bfloat16

# 16 records where bfloat16 values run natively, 8 in float32 (an AVX2-only CPU) to keep the suite short
N_RECORDS = int(os.environ.get("KEDIT_BATCH_RECORDS", "16" if fast_bfloat16(torch.device("cpu")) else "8"))


@pytest.mark.slow
@pytest.mark.parametrize("alg", ["MEMIT", "EMMET"])
def test_one_batch_of_counterfact_edits_is_effective(embedded, shared_data, alg, embedded_caches):
    hparams = load_algorithm_hparams(alg, "smollm2-135m.yaml")
    ctx = EditContext(embedded_caches, seed=0, corpus_path=str(shared_data / "wiki"), value_dtype="bfloat16" if fast_bfloat16(torch.device("cpu")) else "float32")
    records = load_cases("cf", shared_data, limit=N_RECORDS)
    edit = ALGORITHMS[alg].apply(embedded, [r.request for r in records], hparams, ctx)
    try:
        scores = summarize(evaluate_cases(embedded, records))
    finally:
        restore(embedded.model, edit.originals)
    print(f"\n{alg} on smollm2-135m, one batch of {N_RECORDS} CounterFact records: ES {scores['ES']:.3f} "
          f"PS {scores['PS']:.3f} NS {scores['NS']:.3f} S {scores['S']:.3f}, argmax {scores['rewrite_acc']:.3f}")
    # Efficacy as the papers define it: P(target_new) > P(target_true) on the edited prompt.
    assert scores["ES"] >= 0.9
