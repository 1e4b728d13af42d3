import numpy as np
import pytest
import torch

from rome.compute_u import compute_keys
from rome.hparams import ROMEHyperParams
from rome.rome_main import apply_rome
from tests.helpers import REQUESTS, context, rel, tiny_hparams
from util.arch import edited_weight
from util.errors import RequestError
from util.requests import make_request
from util.solve import Covariance, solve_update


@pytest.mark.parametrize("original, target", [(False, "bare"), (False, "templated"), (True, "bare")])
def test_rome_update_maps_key_to_value(tiny64, tmp_path, original, target):
    lm = tiny64
    hp = tiny_hparams(original_implementation=original, rrome_target=target)
    ctx = context(tmp_path)
    request = make_request(REQUESTS[0])
    templates = ctx.templates(lm, hp)
    before = compute_keys(lm, [request], [1], templates, hp.fact_token)
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = apply_rome(lm, [request], hp, ctx)
    W_new = edited_weight(lm.model, lm.arch, 1)
    after = compute_keys(lm, [request], [1], templates, hp.fact_token)
    # Editing layer 1's down projection does not change layer 1's keys.
    torch.testing.assert_close(after.k_star[1], before.k_star[1], rtol=1e-12, atol=1e-12)
    k = (before.k_bare if original else before.k_star)[1][0]
    # v* = W k_bare + delta (the output at the bare prompt plus the optimised delta), reached at
    # k = k_bare (ROME) or k = k* (r-ROME); "templated" r-ROME asks W' k* = W k* + delta instead.
    v_star = W @ (k if target == "templated" else before.k_bare[1][0]) + result.value_deltas[0].double()
    assert rel(W_new @ k, v_star) < 1e-5
    delta = W_new - W
    assert torch.linalg.matrix_rank(delta).item() == 1
    # The update direction is C^-1 k* in both variants.
    C = ctx.covariance(lm, 1, hp).dense()
    u = torch.linalg.solve(C, before.k_star[1][0])
    left = delta @ u / u.norm() ** 2
    torch.testing.assert_close(delta, torch.outer(left, u), rtol=1e-8, atol=1e-12)
    if original:
        assert rel(W_new @ before.k_star[1][0], W @ before.k_star[1][0] + result.value_deltas[0].double()) > 1e-6


def test_rank_one_closed_form_with_identity_covariance():
    torch.manual_seed(0)
    d, m = 5, 7
    W, k, v = torch.randn(d, m, dtype=torch.float64), torch.randn(m, 1, dtype=torch.float64), torch.randn(d, 1, dtype=torch.float64)
    delta, _ = solve_update(v - W @ k, k, Covariance(m), "equality")
    expected = (v - W @ k) @ k.T / (k.T @ k)
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-14)
    # With a covariance and the original ROME's two keys: (v - W k)(C^-1 k*)^T / ((C^-1 k*)^T k)
    A = torch.randn(m, m, dtype=torch.float64)
    C = A @ A.T + m * torch.eye(m, dtype=torch.float64)
    k_star = torch.randn(m, 1, dtype=torch.float64)
    delta, _ = solve_update(v - W @ k, k, Covariance(m, C), "equality", K_dir=k_star)
    u = np.linalg.solve(C.numpy(), k_star.numpy())
    expected = (v - W @ k).numpy() @ u.T / (u.T @ k.numpy())
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-10)


def test_same_seed_same_deltas_bitwise(tiny, tmp_path):
    hp = tiny_hparams()
    deltas = []
    for _ in range(2):
        model_state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
        result = apply_rome(tiny, [make_request(REQUESTS[1])], hp, context(tmp_path))
        deltas.append(result.deltas)
        tiny.model.load_state_dict(model_state)
    for name in deltas[0]:
        assert torch.equal(deltas[0][name], deltas[1][name])


def test_sequential_requests_edit_the_edited_model(tiny, tmp_path):
    hp = tiny_hparams()
    ctx = context(tmp_path)
    W0 = edited_weight(tiny.model, tiny.arch, 1).clone()
    result = apply_rome(tiny, [make_request(r) for r in REQUESTS[:2]], hp, ctx)
    name = tiny.arch.weight_name(1)
    torch.testing.assert_close(tiny.model.get_parameter(name), result.originals[name] + result.deltas[name])
    assert torch.linalg.matrix_rank((edited_weight(tiny.model, tiny.arch, 1) - W0).float()).item() == 2
    assert len(result.requests) == 2


@pytest.mark.parametrize("fields, fragment", [
    ({"prompt": "{} plays", "subject": "Nobody Here", "target_new": "x", "case_id": 7}, None),
    ({"prompt": "LeBron plays", "subject": "Michael Jordan", "target_new": "golf", "case_id": 8}, "case 8: prompt 'LeBron plays' has no '{}'"),
    ({"prompt": "{} plays", "subject": "LeBron James", "target_new": "  ", "case_id": 9}, "case 9: 'target_new' must be a non-empty string"),
    ({"prompt": "{} plays {}", "subject": "LeBron James", "target_new": "golf", "case_id": 10}, "case 10: prompt '{} plays {}'"),
])
def test_bad_requests_name_the_record(fields, fragment):
    if fragment is None:
        assert make_request(fields).text == "Nobody Here plays"
        return
    with pytest.raises(RequestError) as err:
        make_request(fields)
    assert fragment in str(err.value)
