import dataclasses

import pytest
import torch

from alphaedit.alphaedit_main import AlphaEditHyperParams, apply_alphaedit
from encore.encore_main import ENCOREHyperParams, apply_encore
from rome.compute_v import compute_values
from rome.editor import EDITED_KEYS, edit_keys
from tests.helpers import REQUESTS, context, rel, through_checkpoint, tiny_hparams
from editors import ALGORITHMS, load_algorithm_hparams
from util.arch import edited_weight
from util.deltas import restore, snapshot
from util.errors import HparamsError, SolverError
from util.requests import make_request
from util.solve import Covariance, nullspace_basis, solve_update
from util.state import state_from_tensors, state_to_tensors
from util.tokens import encode_with_target

FAST = dict(v_num_grad_steps=4)  # the tests below check the solve, not the values' quality


def spd(m, seed):
    torch.manual_seed(seed)
    A = torch.randn(m, m, dtype=torch.float64)
    return A @ A.T / m


def test_nullspace_solve_is_the_papers_formula_and_lies_in_the_null_space():
    m, d, n = 10, 4, 3
    C0 = spd(m, 0)
    K_p, K, R = (torch.randn(*shape, dtype=torch.float64) for shape in ((m, 2), (m, n), (d, n)))
    eigenvalues = torch.linalg.eigvalsh(C0)
    threshold = eigenvalues[m // 2].item()  # the 5 smallest directions
    U = nullspace_basis(C0, threshold)
    P = U @ U.T
    alpha, prior = 0.3, K_p @ K_p.T
    delta, info = solve_update(R, K, Covariance(m), "nullspace", mu=alpha, prior=prior, basis=U)
    # Delta A = R K^T P with A = K_p K_p^T P + K K^T P + alpha I, solved as A^T Delta^T = P K R^T.
    A = prior @ P + K @ K.T @ P + alpha * torch.eye(m, dtype=torch.float64)
    expected = torch.linalg.solve(A.T, P @ K @ R.T).T
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    assert U.shape[1] == m // 2 and info.extras["nullspace_dim"] == m // 2
    assert (delta - delta @ P).norm() < 1e-12 * delta.norm()
    # Half the smallest eigenvalue: eigh and eigvalsh may differ in the last bit at the smallest one.
    with pytest.raises(SolverError, match="null space is empty"):
        solve_update(R, K, Covariance(m), "nullspace", mu=alpha, basis=nullspace_basis(C0, eigenvalues[0].item() / 2), layer="L")


def test_alphaedit_leaves_the_preserved_keys_unchanged(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    C0 = ctx.second_moments(lm, tiny_hparams(AlphaEditHyperParams))[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(C0)
    threshold = eigenvalues.median().item()  # half of the directions are "preserved"
    # L2 at the tiny model's key scale (its C0 eigenvalues are ~1e-6 .. 1e-1), so the edit is real.
    hp = tiny_hparams(AlphaEditHyperParams, nullspace_threshold=threshold, L2=1e-4, **FAST)
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = apply_alphaedit(lm, [make_request(r) for r in REQUESTS], hp, ctx)
    delta = edited_weight(lm.model, lm.arch, 1) - W
    # Keys along C0's directions above the threshold (the corpus keys' preserved part) keep their
    # outputs: Delta K0 = 0 while W K0 is not.
    K0 = eigenvectors[:, eigenvalues >= threshold] * eigenvalues[eigenvalues >= threshold].sqrt()
    assert (delta @ K0).norm() < 1e-9 * (W @ K0).norm()
    # The corpus keys themselves move by E||Delta k||^2 = tr(Delta C0 Delta^T) <= threshold ||Delta||_F^2
    # (on this tiny model the values ask for ||Delta|| >> ||W||, so this is not small against
    # E||W k||^2: MEMIT minimises exactly that trade-off; AlphaEdit's gain is in sequential runs).
    assert torch.trace(delta @ C0 @ delta.T) <= threshold * delta.norm() ** 2 * (1 + 1e-9)
    record = result.layers[0]
    assert record["nullspace_dim"] == (eigenvalues < threshold).sum().item()
    assert record["lsq_residual"] < 0.1, "the edited keys get (nearly) their values"


def test_encore_solve_satisfies_its_normal_equations(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(ENCOREHyperParams, mom2_update_weight=50.0, update_norm_lambda=0.01, **FAST)
    first, second = [make_request(r) for r in REQUESTS[:2]], [make_request(REQUESTS[2])]
    apply_encore(lm, first, hp, ctx)
    prior = ctx.state[EDITED_KEYS][lm.arch.down_proj(1)].clone()
    K = edit_keys(lm, second, [1], hp, ctx).k_star[1].T  # m x n
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = apply_encore(lm, second, hp, ctx)
    delta = edited_weight(lm.model, lm.arch, 1) - W
    R = result.value_deltas.double().T  # one layer: the residual is the optimised delta
    C0 = ctx.second_moments(lm, hp)[1]
    system = hp.mom2_update_weight * C0 + hp.update_norm_lambda * torch.eye(len(C0), dtype=torch.float64) + prior + K @ K.T
    assert rel(delta @ system, R @ K.T) < 1e-6
    # Without the earlier edits' keys the update would differ: the prior is in play.
    assert rel(delta @ (system - prior), R @ K.T) > 1e-3


ALGS = {
    "AlphaEdit": (AlphaEditHyperParams, apply_alphaedit, dict(nullspace_threshold=1e-3, L2=1e-4)),
    "ENCORE": (ENCOREHyperParams, apply_encore, dict(mom2_update_weight=10.0, update_norm_lambda=0.01)),
}


@pytest.mark.parametrize("alg", ALGS)
def test_edited_keys_accumulate_and_a_resumed_run_is_exact(alg, tiny_gpt2, tmp_path):
    cls, apply, extra = ALGS[alg]
    lm = tiny_gpt2
    lm.model.double()
    hp = tiny_hparams(cls, layers=[1, 2], **extra, **FAST)
    first, second = [make_request(r) for r in REQUESTS[:2]], [make_request(REQUESTS[2])]
    names = [lm.arch.weight_name(layer) for layer in hp.layers]
    start = snapshot(lm.model, names)

    def keys(ctx, requests):  # the edited model's keys: those the next edits must preserve
        k = edit_keys(lm, requests, hp.layers, hp, ctx).k_star
        return {layer: k[layer].T for layer in hp.layers}

    ctx = context(tmp_path)
    apply(lm, first, hp, ctx)
    k_first = keys(ctx, first)
    saved = through_checkpoint(ctx.state, tmp_path)
    after_first = snapshot(lm.model, names)
    apply(lm, second, hp, ctx)
    k_second = keys(ctx, second)
    for layer in hp.layers:  # K_p K_p^T is exactly the sum over the edits' keys
        expected = k_first[layer] @ k_first[layer].T + k_second[layer] @ k_second[layer].T
        torch.testing.assert_close(ctx.state[EDITED_KEYS][lm.arch.down_proj(layer)], expected, rtol=1e-10, atol=1e-14)
    continuous = snapshot(lm.model, names)

    # Resume: the weights after the first edit and the saved state, in a fresh context.
    restore(lm.model, after_first)
    apply(lm, second, hp, context(tmp_path, state=saved))
    for name in names:
        assert torch.equal(lm.model.get_parameter(name), continuous[name]), name
    # Control: resuming without the state gives a different edit.
    restore(lm.model, after_first)
    apply(lm, second, hp, context(tmp_path))
    assert any(rel(lm.model.get_parameter(name) - start[name], continuous[name] - start[name]) > 1e-6 for name in names)


def test_state_round_trips_through_the_pipelines_checkpoint(tmp_path):
    state = {
        EDITED_KEYS: {"transformer.h.1.mlp.c_proj": torch.randn(4, 4, dtype=torch.float64)},
        "edits": 12, "note": {"seed": 0, "layers": [1, 2]}, "bf16": torch.ones(3, dtype=torch.bfloat16),
    }
    tensors, plain = state_to_tensors(state)
    assert set(tensors) == {f"{EDITED_KEYS}/transformer.h.1.mlp.c_proj", "bf16"}
    loaded = through_checkpoint(state, tmp_path)
    assert loaded.keys() == state.keys() and loaded["edits"] == 12 and loaded["note"] == state["note"]
    for got, want in [(loaded[EDITED_KEYS]["transformer.h.1.mlp.c_proj"], state[EDITED_KEYS]["transformer.h.1.mlp.c_proj"]),
                      (loaded["bf16"], state["bf16"])]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert state_from_tensors(*state_to_tensors({})) == {}
    with pytest.raises(ValueError, match="without '/'"):
        state_to_tensors({"a/b": 1})
    with pytest.raises(TypeError):
        state_to_tensors({"a": object()})


def on_top_request(lm, prompt, subject, target):
    """A request whose single target token is (checked here) the argmax after the bare prompt."""
    text = prompt.format(subject)
    full, start = encode_with_target(lm.tok, text, target)
    with torch.no_grad():
        top = lm.model(torch.tensor([full[:start]])).logits[0, -1].argmax().item()
    assert full[start:] == [top], "precondition: the target must already be the top prediction"
    return make_request({"prompt": prompt, "subject": subject, "target_new": target})


def test_most_probable_early_stopping(tiny):
    # Tiny random models with tied embeddings predict the last token again: " was" is on top.
    on_top = on_top_request(tiny, "The king of {} was", "France", "was")
    second_token_off = make_request({"prompt": "The king of {} was", "subject": "France", "target_new": "was Paris"})
    hp = tiny_hparams(v_num_grad_steps=4, v_loss_threshold=0.0, v_argmax_stop_steps=1)
    values = compute_values(tiny, [on_top, second_token_off], 1, ["{}"], hp, site="layer")
    assert values.steps[0] == 0 and values.steps[1] > 0
    assert values.final_loss[0] > 0.05, "the loss rule alone would not have stopped it"
    steps = lambda templates, **kw: compute_values(  # noqa: E731
        tiny, [on_top], 1, templates, dataclasses.replace(hp, **kw), site="layer").steps[0]
    assert steps(["{}"], v_argmax_stop_steps=2) == 1
    assert steps(["{}"], v_argmax_stop_steps=0) == hp.v_num_grad_steps - 1
    # Every templated prompt counts: after "... was and" the top prediction is not " was".
    text = "The king of France was and"
    with torch.no_grad():
        top = tiny.model(tiny.tok(text, return_tensors="pt").input_ids).logits[0, -1].argmax().item()
    assert top != encode_with_target(tiny.tok, "The king of France was", "was")[0][-1]
    assert steps(["{}", "{} and"]) > 0


def test_registry_and_hparams_files():
    for alg in ("AlphaEdit", "ENCORE"):
        for model in ("smollm2-135m", "gpt2-xl", "EleutherAI_gpt-j-6B", "Llama-3-8B"):
            assert type(load_algorithm_hparams(alg, model)) is ALGORITHMS[alg].hparams_class
    assert load_algorithm_hparams("ENCORE", "gpt2-xl").v_argmax_stop_steps == 4
    assert load_algorithm_hparams("MEMIT", "gpt2-xl").v_argmax_stop_steps == 0
    with pytest.raises(HparamsError, match="mom2_adjustment"):
        tiny_hparams(AlphaEditHyperParams, mom2_adjustment=False)
    with pytest.raises(HparamsError, match="v_argmax_stop_steps"):
        tiny_hparams(ENCOREHyperParams, v_argmax_stop_steps=-1)
