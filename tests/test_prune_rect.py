"""PRUNE and RECT: MEMIT's solve, then their defining operation on what is written."""
import math

import pytest
import torch

from memit.memit_main import MEMITHyperParams, apply_memit
from prune.prune_main import PRUNE_STATE, PRUNEHyperParams, apply_prune, restrain
from rect.rect_main import RECTHyperParams, apply_rect, top_relative_mask
from tests.helpers import REQUESTS, context, through_checkpoint, tiny_hparams
from editors import ALGORITHMS, load_algorithm_hparams
from util.deltas import restore, snapshot
from util.errors import HparamsError
from util.requests import make_request

FAST = dict(v_num_grad_steps=4, mom2_update_weight=10.0)
BATCHES = [[make_request(r) for r in REQUESTS[:2]], [make_request(REQUESTS[2])]]


def memit_delta(lm, requests, ctx, name):
    """MEMIT's delta for `requests` on the current weights (which are then put back)."""
    before = snapshot(lm.model, [name])
    result = apply_memit(lm, requests, tiny_hparams(MEMITHyperParams, **FAST), ctx)
    restore(lm.model, before)
    return result.deltas[name].double()


def test_restraint_function():
    s = torch.tensor([0.5, 2.0, 2.0 + 1e-12, 4.0, 40.0], dtype=torch.float64)
    out = restrain(s, 2.0)
    torch.testing.assert_close(out[:3], s[:3], rtol=0, atol=1e-11)  # continuous at s_max
    torch.testing.assert_close(out[3:], torch.tensor([math.log(2) + 2, math.log(20) + 2], dtype=torch.float64))


def test_prune_restrains_the_accumulated_update_singular_values(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(PRUNEHyperParams, **FAST)
    name = lm.arch.weight_name(1)
    W0 = snapshot(lm.model, [name])[name].double()
    sigma_max = torch.linalg.matrix_norm(W0, ord=2).item()
    raw = torch.zeros_like(W0)
    for i, batch in enumerate(BATCHES):
        raw = raw + memit_delta(lm, batch, ctx, name)  # the unrestrained accumulated update
        if i == 1:  # the resumed run is the same run: its state holds the raw sum
            ctx.state = through_checkpoint(ctx.state, tmp_path)
        result = apply_prune(lm, batch, hp, ctx)
        U, S, Vh = torch.linalg.svd(raw, full_matrices=False)
        written = lm.model.get_parameter(name).double() - W0
        # W - W0 = U F(S) V^T: the same singular vectors, F applied to the singular values
        torch.testing.assert_close(written, (U * restrain(S, sigma_max)) @ Vh, rtol=1e-9, atol=1e-12)
        got = torch.linalg.svdvals(written)
        above = S > sigma_max
        assert 0 < above.sum() < len(S) and result.layers[0]["prune_restrained"] == above.sum()
        torch.testing.assert_close(got[~above], S[~above], rtol=0, atol=1e-10)  # the others unchanged
        assert (got[above] < S[above]).all() and (got[above] > sigma_max).all()
    torch.testing.assert_close(ctx.state[PRUNE_STATE]["raw"][name], raw, rtol=1e-9, atol=1e-12)


def test_top_relative_mask_by_hand():
    delta = torch.tensor([[1.0, 1.0, 0.1, -3.0], [0.5, 0.0, 2.0, 1.0]])
    weight = torch.tensor([[1.0, -0.1, 0.01, 10.0], [1.0, 1.0, 1.0, -0.5]])
    # |delta| / |weight| = [[1, 10, 10, 0.3], [0.5, 0, 2, 2]]: the top 25% (2 of 8) are the two 10s
    assert top_relative_mask(delta, weight, 25).tolist() == [[False, True, True, False], [False] * 4]
    assert top_relative_mask(delta, weight, 50).sum() == 4 and top_relative_mask(delta, weight, 100).all()


@pytest.mark.parametrize("percent", [40.0, 5.0])
def test_rect_keeps_exactly_the_top_relative_changes(tiny64, tmp_path, percent):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(RECTHyperParams, rect_top_percent=percent, **FAST)
    name = lm.arch.weight_name(1)
    for batch in BATCHES:  # the second edit ranks its change against the once-edited matrix
        before = snapshot(lm.model, [name])[name]
        full = memit_delta(lm, batch, ctx, name)
        result = apply_rect(lm, batch, hp, ctx)
        after = lm.model.get_parameter(name)
        changed = after != before
        relative = full.abs() / before.abs()
        n_kept = round(full.numel() * percent / 100)
        assert changed.sum() == n_kept == result.layers[0]["rect_kept"]
        assert relative[changed].min() > relative[~changed].max()  # exactly the top k%
        torch.testing.assert_close(after[changed], (before + full)[changed], rtol=0, atol=1e-12)
        assert result.layers[0]["delta_norm"] < result.layers[0]["memit_delta_norm"]


def test_registry_and_hparams_files():
    for alg in ("PRUNE", "RECT"):
        for model in ("smollm2-135m", "gpt2-xl", "EleutherAI_gpt-j-6B", "Llama-3-8B", "Meta-Llama-3-8B-Instruct"):
            assert type(load_algorithm_hparams(alg, model)) is ALGORITHMS[alg].hparams_class
    assert load_algorithm_hparams("RECT", "Llama-3-8B").rect_top_percent == 40
    for alg in ALGORITHMS:  # Instruct hparams for every editor: the base model's (= the AlphaEdit release's) values
        instruct = load_algorithm_hparams(alg, "Meta-Llama-3-8B-Instruct")
        instruct.check_model(32)
        assert instruct == load_algorithm_hparams(alg, "Llama-3-8B"), alg
    with pytest.raises(HparamsError, match="rect_top_percent"):
        tiny_hparams(RECTHyperParams, rect_top_percent=0)
