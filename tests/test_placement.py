"""Where the editing core puts its tensors: solves run on the device of what they are handed (the
edited weight's), nothing is created on a default device, and an offloaded weight is refused.

A CPU-only machine cannot cross real devices, so the tests make the *default* device 'meta'
(torch.device as a context manager) while every input lives on the CPU: a tensor created without
an explicit device then lands on 'meta' and any arithmetic with the inputs fails ("Tensor on
device cpu is not on the expected device meta"), as the first CUDA run failed with cuda:0/cpu."""
from __future__ import annotations

import pytest
import torch

from alphaedit.alphaedit_main import AlphaEditHyperParams
from rome.editor import EDITED_KEYS, EditContext, EditPlan
from tests.helpers import REQUESTS, SOLVING, context, tiny_hparams
from editors import ALGORITHMS
from util.deltas import restore
from util.errors import ModelLoadError
from util.requests import make_request
from util.solve import Covariance, nullspace_basis, solve_update


def spd(m: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(m, m, dtype=torch.float64, generator=generator)
    return A @ A.T / m + 0.1 * torch.eye(m, dtype=torch.float64)


def test_the_default_device_trick_catches_a_tensor_created_without_a_device():
    """The premise of the tests below: what the first CUDA run hit, reproduced on the CPU."""
    inputs = torch.ones(3, 3, dtype=torch.float64)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        torch.zeros(3, 3, dtype=torch.float64) + inputs


@pytest.mark.parametrize("constraint", ["least_squares", "equality", "nullspace"])
def test_every_solve_runs_on_its_inputs_device(constraint):
    m, d, n = 12, 5, 3
    generator = torch.Generator().manual_seed(0)
    C0 = spd(m, 1)
    K, R, K_p = (torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in ((m, n), (d, n), (m, 2)))
    basis = nullspace_basis(C0, torch.linalg.eigvalsh(C0)[m // 2].item())
    kwargs = dict(mu=0.3, prior=K_p @ K_p.T, basis=basis) if constraint == "nullspace" else dict(mu=0.01)
    expected, _ = solve_update(R, K, Covariance(m, C0, 2.0), constraint, **kwargs)
    with torch.device("meta"):
        cov = Covariance(m, C0, 2.0)
        delta, _ = solve_update(R, K, cov, constraint, **kwargs)
        if constraint == "equality":  # the original ROME's direction (LU solve and its check)
            solve_update(R, K, cov, constraint, K_dir=K + 0.1, layer="L")
        # the ridge-only system (AlphaEdit's reduced system, ENCORE without statistics)
        ridge = Covariance(m, extra=0.5 * torch.eye(m, dtype=torch.float64, device=K.device))
        solve_update(R, K, ridge, "least_squares")
        assert ridge.dense(K.device).device == K.device
    assert delta.device == K.device
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)


def test_edit_context_puts_statistics_and_null_space_on_the_weights_device(tiny_llama, tmp_path):
    lm, ctx = tiny_llama, context(tmp_path)
    hp = tiny_hparams(AlphaEditHyperParams, nullspace_threshold=1e-3)
    ctx.second_moments(lm, hp)  # the statistics pass itself runs the model (its own device rules)
    weight_device = lm.model.get_parameter(lm.arch.weight_name(1)).device
    with torch.device("meta"):
        basis = ctx.nullspace(lm, 1, hp, hp.nullspace_threshold)
        cov = ctx.covariance(lm, 1, hp)
        assert basis.device == weight_device and cov.matrix.device == weight_device
        assert cov.solve(torch.ones(cov.dim, 1, dtype=torch.float64, device=weight_device)).device == weight_device
    assert ctx.nullspace(lm, 1, hp, hp.nullspace_threshold) is basis, "computed once per run (cached in the context)"
    assert ctx.covariance(lm, 1, hp) is cov


def offloaded(lm, layer: int):
    """`lm` with every weight offloaded by accelerate as `--device auto` does when the GPUs are
    full: parameters on 'meta', their values streamed from host memory at each forward."""
    from accelerate import cpu_offload

    cpu_offload(lm.model, execution_device=torch.device("cpu"))
    assert lm.model.get_parameter(lm.arch.weight_name(layer)).device.type == "meta"
    return lm


@pytest.mark.parametrize("alg", SOLVING)
def test_an_offloaded_weight_is_refused_up_front_naming_the_layer(alg, tiny_gpt2, tmp_path, monkeypatch):
    lm = offloaded(tiny_gpt2, 1)
    hp = tiny_hparams(ALGORITHMS[alg].hparams_class, **({"original_implementation": True} if alg == "ROME" else {}))
    # Refused before any work: no templates, no statistics, no value optimisation.
    monkeypatch.setattr(EditContext, "templates", lambda *a: pytest.fail("work started before the check"))
    with pytest.raises(ModelLoadError, match=r"layer transformer\.h\.1\.mlp\.c_proj\.weight is offloaded.*--device") as err:
        ALGORITHMS[alg].apply(lm, [make_request(REQUESTS[0])], hp, context(tmp_path))
    assert "\n" not in str(err.value)


def test_edits_in_small_chunks_equal_one_chunk(tiny64, tmp_path, monkeypatch):
    """EditContext's chunk sizes bound an edit's memory (keys and values a few requests at a
    time); one request per chunk gives the update of one chunk of all."""
    import rome.compute_u
    import rome.compute_v

    sizes = []  # the chunks' sizes, seen where compute_keys calls itself per chunk and compute_v optimises each

    def recording(name, real, count):
        def call(lm, requests, *args, **kwargs):
            sizes.append((name, count(requests)))
            return real(lm, requests, *args, **kwargs)
        return call

    for module, name, count in ((rome.compute_u, "compute_keys", len), (rome.compute_v, "_optimise", lambda batch: batch.n_requests)):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name), count))
    hp = tiny_hparams(ALGORITHMS["EMMET"].hparams_class, layers=[1, 2], mom2_update_weight=10.0, emmet_lambda=0.1, v_num_grad_steps=4)
    requests = [make_request(r) for r in REQUESTS]
    whole = ALGORITHMS["EMMET"].apply(tiny64, requests, hp, context(tmp_path))

    restore(tiny64.model, whole.originals)
    assert sizes == [("_optimise", 3)]  # one batch of all
    sizes.clear()
    chunked = ALGORITHMS["EMMET"].apply(tiny64, requests, hp, context(tmp_path, key_chunk_size=1, value_chunk_size=1))
    assert sorted(set(sizes)) == [("_optimise", 1), ("compute_keys", 1)] and len(sizes) == 3 * 3  # keys at 2 layers, values
    for name, delta in whole.deltas.items():
        torch.testing.assert_close(chunked.deltas[name], delta, rtol=1e-9, atol=1e-12 * delta.abs().max().item())



def test_an_edit_first_moves_the_kept_matrices_where_its_plan_says(tiny, tmp_path):
    """C (with its factor), U and K_p K_p^T cached by an earlier edit or a benchmark's warm-up go where
    an edit's plan keeps them before its value optimisation counts on the room that leaves
    (EditContext.place). 'meta' stands in for a GPU: weights moved there, the matrices
    cached on the CPU stand for host memory."""
    hp = tiny_hparams(AlphaEditHyperParams, layers=[1, 2], nullspace_threshold=1e-3)
    ctx = context(tmp_path)
    cov = ctx.covariance(tiny, 1, hp)
    cov.solve(torch.ones(cov.dim, 1, dtype=torch.float64))  # its factor, kept beside it
    ctx.nullspace(tiny, 2, hp, hp.nullspace_threshold)
    ctx.remember_keys(tiny, 2, torch.ones(cov.dim, 2))

    def kept():
        return [cov.matrix, cov._factor, *ctx.cache.nullspaces.values(), *ctx.state[EDITED_KEYS].values()]

    before = kept()
    ctx.place(tiny, EditPlan(host=True))  # host memory is where they are: nothing moves
    assert all(a is b for a, b in zip(kept(), before))
    tiny.model.to("meta")
    ctx.place(tiny, EditPlan(host=False))  # the plan keeps them on the weights' device
    assert len(kept()) == 4 and all(t.device.type == "meta" for t in kept())
