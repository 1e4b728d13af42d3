import numpy as np
import pytest
import torch

from emmet.emmet_main import EMMETHyperParams, apply_emmet
from memit.memit_main import MEMITHyperParams, apply_memit
from rome.rome_main import apply_rome
from rome.editor import edit_keys
from tests.helpers import REQUESTS, context, rel, tiny_hparams
from util.arch import edited_weight
from util.deltas import restore
from util.errors import SolverError
from util.requests import make_request
from util.solve import Covariance, all_finite, solve_least_squares, solve_update


def test_memit_delta_solves_normal_equations_and_matches_lstsq(tiny64, tmp_path):
    lm = tiny64
    hp = tiny_hparams(MEMITHyperParams, mom2_update_weight=50.0)
    ctx = context(tmp_path)
    requests = [make_request(r) for r in REQUESTS]
    K = edit_keys(lm, requests, [1], hp, ctx).k_star[1].T  # m x n
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = apply_memit(lm, requests, hp, ctx)
    delta = edited_weight(lm.model, lm.arch, 1) - W
    R = result.value_deltas.double().T  # one layer: the residual is the optimised delta
    C0 = ctx.second_moments(lm, hp)[1]
    lam = hp.mom2_update_weight
    lhs = delta @ (lam * C0 + K @ K.T)
    assert rel(lhs, R @ K.T) < 1e-6
    # The stacked least-squares problem  Delta [K, sqrt(lam) L] ~ [R, 0]  with C0 = L L^T.
    L = np.linalg.cholesky(C0.numpy())
    A = np.concatenate([K.numpy(), np.sqrt(lam) * L], axis=1)
    B = np.concatenate([R.numpy(), np.zeros((R.shape[0], L.shape[1]))], axis=1)
    expected = np.linalg.lstsq(A.T, B.T, rcond=None)[0].T
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    # The reported residual is ||(W + Delta) K - V|| / ||V|| with V = W K + R: MEMIT trades it
    # against preservation, so it is the lstsq solution's own and above zero.
    V = W @ K + R
    assert len(result.layers) == 1
    assert result.layers[0]["lsq_residual"] == pytest.approx(((W + delta) @ K - V).norm().item() / V.norm().item(), rel=1e-6)
    assert result.layers[0]["lsq_residual"] > 1e-3


def test_memit_spreads_over_layers(tiny, tmp_path):
    hp = tiny_hparams(MEMITHyperParams, layers=[1, 2], mom2_update_weight=10.0)
    result = apply_memit(tiny, [make_request(r) for r in REQUESTS], hp, context(tmp_path))
    assert set(result.deltas) == {tiny.arch.weight_name(1), tiny.arch.weight_name(2)}
    assert all(record["delta_norm"] > 0 for record in result.layers)


def kkt_min_norm(R, K, C):
    """min tr(D C D^T) s.t. D K = R, via the KKT system [[2C, K], [K^T, 0]] solved for each row."""
    m, n = K.shape
    kkt = np.block([[2 * C, K], [K.T, np.zeros((n, n))]])
    rhs = np.concatenate([np.zeros((m, R.shape[0])), R.T], axis=0)
    return np.linalg.solve(kkt, rhs)[:m].T


def test_emmet_equality_is_exact_and_minimum_norm(tiny64, tmp_path):
    lm = tiny64
    ctx = context(tmp_path)
    hp = tiny_hparams(EMMETHyperParams, mom2_update_weight=10.0, emmet_lambda=0.0)
    requests = [make_request(r) for r in REQUESTS]
    K = edit_keys(lm, requests, [1], hp, ctx).k_star[1].T
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = apply_emmet(lm, requests, hp, ctx)
    delta = edited_weight(lm.model, lm.arch, 1) - W
    R = result.value_deltas.double().T
    assert rel(delta @ K, R) < 1e-5  # (W + Delta) K = V with V = W K + R
    C = hp.mom2_update_weight * ctx.second_moments(lm, hp)[1]
    np.testing.assert_allclose(delta.numpy(), kkt_min_norm(R.numpy(), K.numpy(), C.numpy()), rtol=1e-6, atol=1e-10)


def test_emmet_single_edit_equals_r_rome(tiny, tmp_path):
    # No clamp or weight decay is active, so both optimise the same value delta; the updates
    # must then coincide (EMMET's mu is not used for a single edit) when both average keys alike
    # and take the residual at the bare prompt (the reference codes differ in both).
    common = dict(v_weight_decay=0.0, clamp_norm_factor=1e6, mom2_update_weight=7.0, key_average="templates")
    request = make_request(REQUESTS[2])
    ctx = context(tmp_path)
    rome = apply_rome(tiny, [request], tiny_hparams(rrome_target="templated", **common), ctx)
    restore(tiny.model, rome.originals)
    emmet = apply_emmet(tiny, [request], tiny_hparams(EMMETHyperParams, emmet_lambda=0.5, **common), ctx)
    name = tiny.arch.weight_name(1)
    torch.testing.assert_close(emmet.deltas[name], rome.deltas[name], rtol=1e-5, atol=1e-5 * rome.deltas[name].abs().max().item())


def test_emmet_matches_rome_formula_at_solver_level():
    torch.manual_seed(1)
    m, d = 6, 4
    A = torch.randn(m, m, dtype=torch.float64)
    C = Covariance(m, A @ A.T + torch.eye(m, dtype=torch.float64), weight=3.0)
    k, r = torch.randn(m, 1, dtype=torch.float64), torch.randn(d, 1, dtype=torch.float64)
    emmet, _ = solve_update(r, k, C, "equality", mu=0.0)
    u = C.solve(k)
    torch.testing.assert_close(emmet, r @ u.T / (u.T @ k), rtol=1e-10, atol=1e-12)


def test_singular_systems_name_the_layer_and_condition():
    m = 4
    K = torch.ones(m, 2, dtype=torch.float64)  # two identical keys: K^T C^-1 K is singular
    R = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(SolverError, match=r"layer model.layers.3.mlp.down_proj: .*condition number"):
        solve_update(R, K, Covariance(m), "equality", mu=0.0, layer="model.layers.3.mlp.down_proj")
    with pytest.raises(SolverError, match="condition number"):
        solve_least_squares(R, K, Covariance(m, torch.zeros(m, m, dtype=torch.float64)), layer="L")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_update_is_refused_wherever_it_sits(bad):
    # all_finite checks a few rows at a time (no whole-size temporaries): every block is read
    R, K = torch.randn(600, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    assert all_finite(R) and all_finite(R, rows=7)
    for row in (0, 255, 256, 599):
        broken = R.clone()
        broken[row, 0] = bad
        assert not all_finite(broken) and not all_finite(broken, rows=7)
        with pytest.raises(SolverError, match="update is not finite"):
            solve_update(broken, K, Covariance(4), "least_squares")
