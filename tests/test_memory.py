"""The device memory budget (`max_gpu_memory`, util/memory.py): chunk sizes and the statistics batch
derived from it, checked on the CPU (the estimate depends on shapes and dtypes, not the device)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import rome.compute_v
from editors import ALGORITHMS, edit
from experiments.pipeline.run_config import RunOptions
from util.errors import RunError
from rome.editor import EDITED_KEYS, KEY_CHUNK, VALUE_CHUNK, EditPlan, Solver
from rome.values.stacks import UpperModules
from tests.helpers import EXTRA, KEPT, REQUESTS, SOLVING, context, host_budget, layout, tiny_hparams
from util.deltas import restore
from util.errors import HparamsError, MemoryBudgetError
from util.memory import (GIB, HEADROOM, ModelShape, SolverPlacement, plan, replay_copy_bytes, resident_bytes,
                         solver_matrices, stats_batch_tokens)
from util.requests import make_request
from util.solve import Covariance
from util.state import state_from_tensors, state_to_tensors
from util.stats import StatsCache, batch_tokens_for

REQS = [make_request(r) for r in REQUESTS]


def emmet_hparams(**extra):
    return tiny_hparams(ALGORITHMS["EMMET"].hparams_class, layers=[1, 2], mom2_update_weight=10.0, emmet_lambda=0.1,
                        v_num_grad_steps=4, **extra)


def budget_plan(lm, ctx, hp, gib: float, matrices: tuple[int, int] = (2, 2)):
    shape = layout(lm, ctx, hp, REQS).shape(hp.v_loss_layer, hp.layers[-1])
    return plan(lm.model, ModelShape.of(lm), shape, gib, None, [], len(hp.layers), matrices)


def chunk_sizes(ctx, lm, hp, matrices):
    plan = ctx.plan(lm, REQS, hp, matrices)
    return plan.key_chunk, plan.value_chunk


def test_chunk_sizes_shrink_with_the_budget_and_stay_within_it(tiny, tmp_path):
    hp, ctx = emmet_hparams(), context(tmp_path)
    matrices = solver_matrices("equality", True, False)
    chunks = []
    for gib in (1.0, 0.25, 0.06, 0.03):
        ctx.configure(max_gpu_memory=gib)
        key_chunk, value_chunk = chunk_sizes(ctx, tiny, hp, matrices)
        chunks.append((key_chunk, value_chunk))
        estimate = budget_plan(tiny, ctx, hp, gib, matrices)
        for chunk, per_request, fixed in ((key_chunk, estimate.key_request, 0), (value_chunk, estimate.value_request, estimate.value_fixed)):
            # by design within the budget, and the largest chunk that is
            assert estimate.resident + fixed + chunk * per_request <= HEADROOM * gib * GIB
            assert estimate.resident + fixed + (chunk + 1) * per_request > HEADROOM * gib * GIB
    assert all(a >= b for a, b in zip(chunks, chunks[1:])) and chunks[0][1] > chunks[-1][1] >= 1, chunks
    assert chunks[0][0] > chunks[-1][0]
    # the solver's matrices count per edited layer (m x m float64 each)
    m = ModelShape.of(tiny).mlp
    assert budget_plan(tiny, ctx, hp, 0.06, (4, 3)).resident - budget_plan(tiny, ctx, hp, 0.06, (0, 3)).resident == 4 * 2 * m * m * 8
    assert solver_matrices("nullspace", True, True) == (2, 3) and solver_matrices("least_squares", True, False) == (1, 3)
    # explicit sizes win over the budget; without either, the defaults
    ctx.configure(key_chunk_size=7, value_chunk_size=5)
    assert chunk_sizes(ctx, tiny, hp, matrices) == (7, 5)
    assert chunk_sizes(context(tmp_path), tiny, hp, (0, 0)) == (KEY_CHUNK, VALUE_CHUNK)


def test_a_small_budget_chunks_the_edit_and_gives_the_same_update(tiny64, tmp_path, monkeypatch):
    hp = emmet_hparams()
    whole = ALGORITHMS["EMMET"].apply(tiny64, REQS, hp, context(tmp_path))
    restore(tiny64.model, whole.originals)
    ctx = context(tmp_path)
    estimate = budget_plan(tiny64, ctx, hp, 1.0)
    # room for one request's value optimisation and a half: three value batches of one request
    gib = (estimate.resident + 1.5 * estimate.value_request) / HEADROOM / GIB
    batches = []
    real = rome.compute_v._optimise
    monkeypatch.setattr(rome.compute_v, "_optimise", lambda lm, batch, *a: batches.append(batch.n_requests) or real(lm, batch, *a))
    ctx.configure(max_gpu_memory=gib)
    chunked = ALGORITHMS["EMMET"].apply(tiny64, REQS, hp, ctx)
    assert chunked.chunk_sizes["values"] == 1 and batches == [1, 1, 1]  # the chunks of the edit's one layout
    assert whole.chunk_sizes == {"keys": KEY_CHUNK, "values": VALUE_CHUNK}
    for name, delta in whole.deltas.items():
        torch.testing.assert_close(chunked.deltas[name], delta, rtol=1e-9, atol=1e-12 * delta.abs().max().item())


def test_an_impossible_budget_stops_with_one_line(tiny, tmp_path):
    hp = tiny_hparams(ALGORITHMS["R-ROME"].hparams_class)
    request = {k: v for k, v in REQUESTS[0].items() if k != "case_id"}
    needed = resident_bytes(tiny.model) / GIB
    ctx = context(tmp_path)
    ctx.second_moments(tiny, hp)  # statistics computed without a budget: the edit itself is refused
    ctx.configure(max_gpu_memory=needed)  # the weights alone fill it
    with pytest.raises(MemoryBudgetError) as err:
        edit(tiny.model, tiny.tok, [request], hp, context=ctx)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"max_gpu_memory {needed:.3g} GiB cannot hold an edit of") and "give at least" in message
    # the statistics pass is refused the same way
    with pytest.raises(MemoryBudgetError, match="cannot hold one key-statistics window of 64 tokens"):
        context(tmp_path, max_gpu_memory=needed, stats=StatsCache(tmp_path / "empty")).second_moments(tiny, hp)
    with pytest.raises(HparamsError, match="not both"):
        edit(tiny.model, tiny.tok, [request], hp, context=ctx, max_gpu_memory=1.0)
    with pytest.raises(RunError, match="--max_gpu_memory must be a positive number of GiB"):
        RunOptions(max_gpu_memory=0).validate()


def test_statistics_batch_from_the_free_bytes(tiny_llama, tmp_path):
    """The formula a GPU's free memory (torch.cuda.mem_get_info) goes through, fed free bytes on the CPU."""
    shape = ModelShape.of(tiny_llama)
    per_token = 4 * (4 * shape.hidden + 3 * shape.mlp) + 4 * shape.heads * 64 + 2 * shape.mlp * (4 + 4)
    fixed = 2 * shape.mlp ** 2 * (4 + 8)
    for free in (10 ** 6, 10 ** 7, 10 ** 8):
        tokens = batch_tokens_for(tiny_llama, 2, "float32", window=64, free_bytes=free)
        assert tokens == min(1 << 17, (free - fixed) // 2 // per_token)
        assert 2 * tokens * per_token + fixed <= free
    assert batch_tokens_for(tiny_llama, 2, "float32", 64, 10 ** 6) < batch_tokens_for(tiny_llama, 2, "float32", 64, 10 ** 7)
    assert stats_batch_tokens(shape, 2, 4, 64, fixed) == 0  # nothing left after the Gram matrices
    # under a budget the context hands the statistics pass a batch that fits in its room
    hp = tiny_hparams(ALGORITHMS["R-ROME"].hparams_class)
    gib = (resident_bytes(tiny_llama.model) + 10 ** 7) / HEADROOM / GIB
    tokens = context(tmp_path, max_gpu_memory=gib)._stats_batch_tokens(tiny_llama, hp, 1)
    assert tokens == batch_tokens_for(tiny_llama, 1, "float32", 64, int(gib * GIB * HEADROOM) - resident_bytes(tiny_llama.model))


def test_alphaedit_keeps_no_covariance_on_the_device(tiny, tmp_path):
    """AlphaEdit solves with the null-space basis only: no copy of C per layer (m x m float64 each)."""
    hp = tiny_hparams(ALGORITHMS["AlphaEdit"].hparams_class, nullspace_threshold=1e-3, L2=1e-4, v_num_grad_steps=2)
    ctx = context(tmp_path)
    ALGORITHMS["AlphaEdit"].apply(tiny, REQS[:1], hp, ctx)
    assert not ctx.cache.covariances and len(ctx.cache.nullspaces) == 1


def test_replay_copies_count_only_when_the_model_is_not_in_the_value_dtype(tiny):
    """The estimate follows rome/values/replay.py: a float32 model's replayed matrices are copied in
    bfloat16 (the bytes of storage the copies add), a bfloat16 model's are not copied at all."""
    def copies(lm):
        upper = UpperModules(lm, 1, 3, torch.bfloat16)
        model_storage = {p.data_ptr() for p in lm.model.parameters()}
        added = {p.data_ptr(): p.numel() * p.element_size() for m in (*upper.layers, upper.norm, upper.unembed)
                 for p in m.parameters() if p.dim() >= 2 and p.data_ptr() not in model_storage}
        return upper.copied, sum(added.values()), replay_copy_bytes([*upper.originals, upper.norm, upper.unembed], torch.bfloat16)

    copied, added, estimate = copies(tiny)
    assert copied and added == estimate > 0
    assert replay_copy_bytes(UpperModules(tiny, 1, 3, None).layers, None) == 0
    tiny.model.to(torch.bfloat16)
    assert copies(tiny) == (False, 0, 0)


def test_kept_matrices_go_to_host_memory_when_the_device_cannot_hold_them(tiny, tmp_path):
    hp, ctx = emmet_hparams(), context(tmp_path)
    matrices = solver_matrices("equality", True, True)  # C, its factor, K_p K_p^T kept; 2 transient
    shape, weights = ModelShape.of(tiny), resident_bytes(tiny.model)
    m, d = shape.mlp, shape.hidden
    originals = 2 * d * m * shape.width  # the edit's copies of its two edited weights
    roomy = budget_plan(tiny, ctx, hp, 1.0, matrices)
    # enough budget: kept on the device; a solve adds its right-hand side and solution (d x m each)
    assert not roomy.host and roomy.resident == weights + originals + 2 * 3 * m * m * 8
    assert roomy.solve == 2 * m * m * 8 + 2 * d * m * 8
    gib = host_budget(tiny, ctx, hp, REQS, Solver("equality", remember_keys=True))
    tight = budget_plan(tiny, ctx, hp, gib, matrices)
    # room for the weights and one layer's solve with its kept matrices moved in, not for every kept one
    assert tight.host and tight.resident == weights + originals and tight.solve == (2 + 3) * m * m * 8 + 2 * d * m * 8
    assert tight.key_chunk() >= 1 and tight.value_chunk() >= 1
    with pytest.raises(MemoryBudgetError, match="weights, the copies of the edited ones and solver matrices take"):
        replace(tight, host=False).check()  # what the plan said before host memory was an option
    # room for every request's values in one batch in host placement: the kept matrices would fit on
    # the device, but only with one batch more there, so they go to host memory as well
    snug = budget_plan(tiny, ctx, hp, (weights + originals + len(REQS) * roomy.value_request + 64) / HEADROOM / GIB, matrices)
    assert replace(snug, host=False).fits() and replace(snug, host=False).value_chunk() < len(REQS)
    assert snug.host and snug.used_chunks(len(REQS)) == (len(REQS), len(REQS))
    ctx.configure(max_gpu_memory=gib)
    assert ctx.plan(tiny, REQS, hp, matrices) == EditPlan(tight.key_chunk(), tight.value_chunk(), True)
    ctx.configure(max_gpu_memory=1.0)
    assert ctx.plan(tiny, REQS, hp, matrices) == EditPlan(roomy.key_chunk(), roomy.value_chunk(), False)
    # a budget that cannot hold the host plan either still stops with one line, naming the weights alone
    with pytest.raises(MemoryBudgetError, match=r"the copies of the edited ones take [\d.]+ GiB") as err:
        budget_plan(tiny, ctx, hp, weights / GIB, matrices).check()
    assert "\n" not in str(err.value)


def test_solver_placement_keeps_where_it_says():
    """Device placement moves a matrix to the weight's device; host placement leaves a host tensor
    where it is (pinned only for a CUDA weight). 'meta' stands in for a device the CPU is not."""
    t = torch.ones(3, 3, dtype=torch.float64)
    meta = torch.device("meta")
    assert SolverPlacement(torch.device("cpu")).keep(t) is t and SolverPlacement(torch.device("cpu"), host=True).keep(t) is t
    assert SolverPlacement(meta).keep(t).device == meta and SolverPlacement(meta).kept_on == meta
    assert SolverPlacement(meta, host=True).keep(t) is t and SolverPlacement(meta, host=True).kept_on == torch.device("cpu")
    total = SolverPlacement(meta, host=True).add(t, t)  # K_p K_p^T grows where it is kept, into a new tensor
    assert total.device.type == "cpu" and torch.equal(total, 2 * t) and torch.equal(t, torch.ones(3, 3, dtype=torch.float64))
    # a Covariance keeps its factor beside its matrix, where its placement says, not on the solve's device
    C0 = torch.eye(3, dtype=torch.float64) * 2
    cov = Covariance(3, C0).kept(SolverPlacement(meta, host=True).keep)
    torch.testing.assert_close(cov.solve(torch.ones(3, 1, dtype=torch.float64)), torch.full((3, 1), 0.5, dtype=torch.float64))
    assert cov.matrix.device.type == cov._factor.device.type == "cpu"
    cov.kept(SolverPlacement(meta).keep)  # a later edit that fits on the device moves both there
    assert cov.matrix.device == cov._factor.device == meta


@pytest.mark.parametrize("alg", sorted(KEPT))
def test_kept_matrices_in_host_memory_give_the_same_update(alg, tiny_llama, tmp_path):
    """A budget that sends the kept matrices to host memory changes where they live, not the update:
    bitwise equal deltas and K_p K_p^T over two sequential edits (chunk sizes given, so that only the
    placement differs, with the run state restored from its checkpoint form between the edits; on
    the CPU host and device memory are one, so this checks the data flow; tests/test_gpu.py checks
    where the matrices live on a GPU)."""
    lm = tiny_llama
    lm.model.double()
    hp = tiny_hparams(ALGORITHMS[alg].hparams_class, **{**EXTRA[alg], "v_num_grad_steps": 3})
    stats = StatsCache(tmp_path / "stats")
    runs = {}
    for where in ("device", "host"):
        ctx = context(tmp_path, stats=stats, key_chunk_size=2, value_chunk_size=2)
        if where == "host":  # the placement is planned per edit: a budget too small for both
            ctx.configure(max_gpu_memory=min(host_budget(lm, ctx, hp, part, ALGORITHMS[alg].solver) for part in (REQS[:2], REQS[2:])))
        first = ALGORITHMS[alg].apply(lm, REQS[:2], hp, ctx)
        ctx.state = state_from_tensors(*state_to_tensors(ctx.state))  # as a resumed run has it
        second = ALGORITHMS[alg].apply(lm, REQS[2:], hp, ctx)
        restore(lm.model, first.originals)
        assert first.solver_matrices == second.solver_matrices == where
        runs[where] = (first.deltas, second.deltas, ctx.state.get(EDITED_KEYS, {}))
    for device, host in zip(runs["device"], runs["host"]):
        assert device.keys() == host.keys()
        for name in device:
            assert torch.equal(device[name], host[name]), name


@pytest.mark.parametrize("alg", SOLVING)
def test_the_registry_names_the_solver_each_editor_solves_with(alg, tiny_llama, tmp_path, monkeypatch):
    # Memory plans read ALGORITHMS[alg].solver without editing: it must be what the editor passes.
    import importlib

    class Stop(Exception):
        pass

    seen = []

    def record(lm, requests, hparams, ctx, solver, **kwargs):
        seen.append(solver)
        raise Stop

    for module in ("rome.rome_main", "memit.memit_main", "emmet.emmet_main", "alphaedit.alphaedit_main", "encore.encore_main"):
        monkeypatch.setattr(importlib.import_module(module), "edit_layers", record)
    hp = tiny_hparams(ALGORITHMS[alg].hparams_class, **EXTRA[alg])
    with pytest.raises(Stop):
        ALGORITHMS[alg].apply(tiny_llama, REQS[:1], hp, context(tmp_path))
    assert seen == [ALGORITHMS[alg].solver]
