"""CUDA against CPU (`pytest -m gpu`; skipped where torch sees no CUDA device).

Every editor edits the same tiny float64 GPT-2 and Llama models once on the CPU and once on the
GPU with the same seed, and one editor of each solve (equality, least squares, null space) every
other family of util/arch.py's table (tests/test_arch.py's tiny models); the updates must agree
to 1e-8 relative where the devices' float64 forwards agree to float64 rounding, to 1e-5 where
transformers computes in float32 inside the model (`tolerance`). `-k arch` selects those and the templates and statistics across devices. Both runs share one statistics
object (C0 is computed once, on the CPU, as a cached run would reuse it), so what is compared is
the edit itself: templates, keys, values, solves and null spaces on the GPU. Templates are sampled
with a CPU generator, so one seed gives the same texts on both devices (tested separately here).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import rome.editor

from alphaedit.alphaedit_main import AlphaEditHyperParams
from rome.editor import EDITED_KEYS, EditContext
from rome.templates import generate_templates
from experiments.tiny_model import tiny_model
from tests.conftest import tiny_gpt2_model, tiny_llama_model
from tests.helpers import EXTRA, KEPT, REQUESTS, SOLVING, context, float64_context, host_budget, rel, tiny_hparams, write_corpus
from tests.test_arch import LISTED
from editors import ALGORITHMS
from util.arch import arch_for
from util.corpus import local_corpus
from util.models import LoadedModel
from util.requests import make_request
from util.state import state_from_tensors, state_to_tensors
from util.stats import StatsCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOLERANCE = 1e-8  # where the two devices' float64 forwards agree to float64 rounding (GPT-2)
# transformers computes rotary cos/sin (and Llama-style RMSNorm) in float32 whatever the model's
# dtype, and CUDA's float32 rounds otherwise than the CPU's: on those families the unedited
# forwards already differ by ~1e-7 (measured on an H200), and solves amplify it (up to 2.4e-6 there)
FLOAT32_INSIDE_TOLERANCE = 1e-5
_FORWARD_GAPS: dict[str, float] = {}
# The requests compared across devices end within 5 tokens of their subject: the tiny Mistral's
# sliding window is 6, and REQUESTS' "Eiffel Tower is located in the city of" (6 tokens after the
# subject) gets no gradient from its target through it, so Adam's normalised steps on a gradient of
# rounding noise make any value of it (on an H200, CPU and CUDA updates 0.5-2.0 apart in one run and
# 1e-7 in another; on the CPU a 1e-8 perturbation of the weights moves them as far)
WINDOWED = [dict(r, prompt="{} is in the city of") if r["subject"] == "Eiffel Tower" else r for r in REQUESTS]
BUILD = {"gpt2": tiny_gpt2_model, "llama": tiny_llama_model}
# every editor on GPT-2 and Llama; on the other families one editor per kind of solve
ARCH_ALGS = [(alg, arch) for arch in LISTED for alg in (SOLVING if arch in BUILD else ("AlphaEdit", "MEMIT", "R-ROME"))]


def tiny_on(arch: str, tok, device: str) -> LoadedModel:
    model = (BUILD[arch](len(tok)) if arch in BUILD else tiny_model(arch, tok)).double().to(device)
    return LoadedModel(model, tok, arch_for(model), f"tiny-{arch}")


def warm_cuda_libraries() -> None:
    """Make the process's first cuBLAS and cuSOLVER calls, whose workspaces (tens of MiB, once per
    process and stream) torch allocates on the device and counts: the memory plans leave them out,
    as a run has made them (loading, statistics) before its first edit. Run first in a process, the
    budget test counted them (0.089 GiB against 0.030 on an H200)."""
    for dtype in (torch.float32, torch.float64):
        a = torch.eye(8, dtype=dtype, device="cuda")
        torch.cholesky_solve(a @ a, torch.linalg.cholesky(a))
    torch.cuda.synchronize()


def forward_gap(arch: str, tok) -> float:
    """||logits(CUDA) - logits(CPU)|| / ||logits(CPU)|| of the unedited float64 model of `arch` on
    one prompt: how far apart the devices are before any edit."""
    if arch not in _FORWARD_GAPS:
        ids = tok("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
        logits = {device: tiny_on(arch, tok, device).model(ids.to(device)).logits.cpu() for device in ("cpu", "cuda")}
        _FORWARD_GAPS[arch] = rel(logits["cuda"], logits["cpu"])
    return _FORWARD_GAPS[arch]


def tolerance(arch: str, tok) -> float:
    """How closely the devices' edits must agree on `arch`, from how closely their forwards do;
    never more than float32 rounding apart (a different computation is caught either way)."""
    gap = forward_gap(arch, tok)
    assert gap <= 1e-6, f"{arch}: CPU and CUDA forwards differ by {gap:.2g}, more than float32 rounding"
    return TOLERANCE if gap <= 1e-13 else FLOAT32_INSIDE_TOLERANCE


@pytest.mark.parametrize("alg, arch", ARCH_ALGS)
def test_arch_cuda_update_equals_cpu_update(alg, arch, tokenizer, tmp_path):
    hp = tiny_hparams(ALGORITHMS[alg].hparams_class, **EXTRA[alg])
    requests = [make_request(r) for r in WINDOWED]
    one_request = alg in ("ROME", "R-ROME")  # sequential anyway; keeps the test short
    stats = StatsCache(tmp_path / "stats")
    if alg == "AlphaEdit" and arch not in BUILD:  # each family's key scale: a quarter or more of C0's directions below the cut
        lm = tiny_on(arch, tokenizer, "cpu")
        moments = float64_context(lm, tmp_path, stats=stats).second_moments(lm, hp)
        hp = dataclasses.replace(hp, nullspace_threshold=max(torch.quantile(torch.linalg.eigvalsh(c), 0.25).item() for c in moments.values()))
    results = {}
    for device in ("cpu", "cuda"):
        lm = tiny_on(arch, tokenizer, device)
        ctx = float64_context(lm, tmp_path, stats=stats)
        # Two calls, so that AlphaEdit's and ENCORE's K_p K_p^T of the first edit enters the second.
        first = ALGORITHMS[alg].apply(lm, requests[:1] if one_request else requests[:2], hp, ctx)
        second = ALGORITHMS[alg].apply(lm, requests[2:], hp, ctx)
        for name in first.deltas:
            assert lm.model.get_parameter(name).device.type == device
        results[device] = (first.deltas, second.deltas)
    allowed = tolerance(arch, tokenizer)
    for (cpu, gpu) in zip(results["cpu"], results["cuda"]):
        assert cpu.keys() == gpu.keys()
        for name in cpu:
            assert gpu[name].device.type == "cpu"  # results are handed back on the host
            assert rel(gpu[name], cpu[name]) <= allowed, (name, rel(gpu[name], cpu[name]), allowed)


@pytest.mark.parametrize("arch", LISTED)
def test_arch_templates_and_statistics_agree_across_devices(arch, tokenizer, tmp_path, caches):
    corpus = local_corpus(write_corpus(tmp_path), caches)
    models = {device: tiny_on(arch, tokenizer, device) for device in ("cpu", "cuda")}
    templates = {d: generate_templates(lm, [[5, 3], [8, 2]], seed=7) for d, lm in models.items()}
    assert templates["cpu"] == templates["cuda"]
    moments = {d: StatsCache(tmp_path / d).second_moments(lm, [1, 2], corpus, 8, 64, "float64", progress=False)
               for d, lm in models.items()}
    exact = tolerance(arch, tokenizer) == TOLERANCE
    for layer in (1, 2):
        if exact:
            torch.testing.assert_close(moments["cuda"][layer].mom2, moments["cpu"][layer].mom2, rtol=1e-10, atol=1e-12)
        else:  # keys computed through float32 rotary embeddings or norms
            assert rel(moments["cuda"][layer].mom2, moments["cpu"][layer].mom2) <= FLOAT32_INSIDE_TOLERANCE


def test_alphaedit_null_space_is_computed_on_the_gpu(tokenizer, tmp_path):
    lm = tiny_on("llama", tokenizer, "cuda")
    hp = tiny_hparams(AlphaEditHyperParams, nullspace_threshold=1e-3)
    ctx: EditContext = context(tmp_path)
    assert ctx.nullspace(lm, 1, hp, hp.nullspace_threshold).device.type == "cuda"
    assert ctx.covariance(lm, 1, hp).matrix.device.type == "cuda"


def test_an_edit_under_max_gpu_memory_stays_within_it(tokenizer, tmp_path):
    """The budget's estimate (util/memory.py) bounds what torch allocates on the GPU: a budget with
    room for one and a half requests' value optimisation chunks the batch and is not exceeded.
    Counted from what was allocated before this test's model (earlier tests' tensors that a failure
    report still holds are not this edit's)."""
    import gc

    from tests.helpers import layout
    from util.memory import GIB, HEADROOM, ModelShape, plan, solver_matrices

    gc.collect()
    warm_cuda_libraries()
    before = torch.cuda.memory_allocated()
    lm = tiny_on("llama", tokenizer, "cuda")
    hp = tiny_hparams(ALGORITHMS["EMMET"].hparams_class, **EXTRA["EMMET"])
    requests = [make_request(r) for r in REQUESTS]
    ctx = context(tmp_path)
    matrices = solver_matrices("equality", hp.mom2_adjustment, False)
    for layer in hp.layers:
        ctx.covariance(lm, layer, hp)  # statistics and C on the device, outside the measured edit
    shape = layout(lm, ctx, hp, requests).shape(hp.v_loss_layer, hp.layers[-1])
    estimate = plan(lm.model, ModelShape.of(lm), shape, 1.0, None, [], len(hp.layers), matrices)
    ctx.configure(max_gpu_memory=(estimate.resident + 1.5 * estimate.value_request) / HEADROOM / GIB)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = ALGORITHMS["EMMET"].apply(lm, requests, hp, ctx)
    peak = torch.cuda.max_memory_allocated() - before
    assert result.chunk_sizes["values"] == 1
    assert peak <= ctx.config.max_gpu_memory * GIB, (peak / GIB, ctx.config.max_gpu_memory)


def test_the_plan_bounds_an_edit_whose_solve_dominates(tokenizer, tmp_path):
    """util/memory.py's estimated peak bounds what one MEMIT edit allocates on the GPU where the
    m x m float64 solves dominate (an MLP of 2,048 on a hidden size of 48). Seen on an H200 at the
    Llama-3-8B shape: MEMIT's batch-1 peak 27.9 GiB against a plan of 26, while the solve kept its
    system alive beside the factor and the copy torch.cholesky_solve makes, a float64 copy of W
    lived through it, and the plan counted neither the solve's d x m matrices nor the edit's copies
    of the edited weights."""
    import gc

    from tests.helpers import layout
    from util.memory import ModelShape, plan, solver_matrices

    m = 2048
    hp = tiny_hparams(ALGORITHMS["MEMIT"].hparams_class, **EXTRA["MEMIT"])
    requests = [make_request(REQUESTS[0])]
    gc.collect()
    warm_cuda_libraries()
    before = torch.cuda.memory_allocated()
    model = tiny_llama_model(len(tokenizer), intermediate_size=m).double().to("cuda")
    lm = LoadedModel(model, tokenizer, arch_for(model), "tiny-llama-wide")
    ctx = context(tmp_path)
    # a well-conditioned C0 (the small corpus has fewer tokens than keys): the test is of memory
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, m, dtype=torch.float64, generator=generator)
    ctx.second_moments = lambda lm, hparams: {layer: a @ a.T / m + torch.eye(m, dtype=torch.float64) for layer in hparams.layers}
    for layer in hp.layers:
        ctx.covariance(lm, layer, hp)  # C on the device, kept across edits, outside the measured edit
    shape = layout(lm, ctx, hp, requests).shape(hp.v_loss_layer, hp.layers[-1])
    estimate = plan(lm.model, ModelShape.of(lm), shape, 1000.0, None, [], len(hp.layers), solver_matrices("least_squares", True, False))
    assert not estimate.host and estimate.solve > estimate.value_request  # the solve is the largest phase
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ALGORITHMS["MEMIT"].apply(lm, requests, hp, ctx)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= estimate.peak(len(requests)), (peak / 2**20, estimate.peak(len(requests)) / 2**20)


def test_a_replayed_allocator_trace_finds_the_peak_torch_measured(tokenizer, tmp_path):
    """benchmark.py --trace_memory's replay (experiments/benchmarking/device.py): the peak it finds
    in an edit's trace is the one torch's allocator counted, and the blocks live then are named by
    this repository's lines. (On an H200, a first replay that ignored frees of blocks older than the
    trace found MEMIT batch 1's peak exactly and batch 64's 0.2 GiB low, of 30.6.)"""
    from experiments.benchmarking.device import Traced

    warm_cuda_libraries()
    lm = tiny_on("llama", tokenizer, "cuda")
    hp = tiny_hparams(ALGORITHMS["MEMIT"].hparams_class, **EXTRA["MEMIT"])
    ctx = context(tmp_path)
    for layer in hp.layers:
        ctx.covariance(lm, layer, hp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with Traced() as traced:
        ALGORITHMS["MEMIT"].apply(lm, [make_request(r) for r in REQUESTS], hp, ctx)
    measured = torch.cuda.max_memory_allocated()
    assert abs(traced.blocks.peak - measured) <= 0.02 * measured, (traced.blocks.peak, measured)
    assert any(where.split(":")[0].endswith(".py") for where, _, _ in traced.blocks.groups), traced.blocks.groups


def test_value_steps_between_reads_do_not_wait_for_the_gpu(tokenizer, caches):
    # The host reads the stopping state only every sync_every steps: with one read at the end, 8
    # and 16 steps make the same number of synchronising calls (counted by CUDA's sync debug mode).
    # A first, uncounted call takes any one-time synchronisation (on an H200, counting from the
    # first call, 8 steps made one more than 16 did).
    import warnings

    from rome.compute_v import ValueSettings, compute_values

    lm = tiny_on("llama", tokenizer, "cuda")
    requests = [make_request(r) for r in REQUESTS]
    counts = []
    for steps in (8, 8, 16):
        hp = tiny_hparams(v_num_grad_steps=steps, v_loss_threshold=0.0)
        templates = EditContext(caches).templates(lm, hp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                compute_values(lm, requests, 1, templates, hp, settings=ValueSettings(sync_every=steps))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[1] == counts[2], counts


def kept_matrices(ctx: EditContext) -> list[torch.Tensor]:
    kept = [t for cov in ctx.cache.covariances.values() for t in (cov.matrix, cov._factor) if t is not None]
    return kept + [*ctx.cache.nullspaces.values(), *ctx.state.get(EDITED_KEYS, {}).values()]


def on_host_first(ctx: EditContext, optimise_values):
    """optimise_values, once every kept matrix is checked to be in host memory when it starts."""
    def call(*args, **kwargs):
        assert all(t.device.type == "cpu" for t in kept_matrices(ctx)), "kept matrices on the GPU during values"
        return optimise_values(*args, **kwargs)
    return call


@pytest.mark.parametrize("alg", sorted(KEPT))
def test_kept_matrices_in_pinned_host_memory_give_the_device_update(alg, tokenizer, tmp_path, monkeypatch):
    """Under a budget that cannot hold them, C, its factor, U and K_p K_p^T live in pinned host memory
    (those a warm-up made on the GPU leave it before the edit's values), a state restored from a
    checkpoint (host memory, unpinned) is kept there too, and the updates equal those with everything
    on the GPU (chunk sizes given, so that only the placement differs)."""
    hp = tiny_hparams(ALGORITHMS[alg].hparams_class, **EXTRA[alg])
    requests = [make_request(r) for r in REQUESTS]
    stats = StatsCache(tmp_path / "stats")
    runs = {}
    for where in ("device", "host"):
        lm = tiny_on("llama", tokenizer, "cuda")
        ctx = context(tmp_path, stats=stats, key_chunk_size=2, value_chunk_size=2)
        if where == "host":
            ctx.configure(max_gpu_memory=min(host_budget(lm, ctx, hp, part, ALGORITHMS[alg].solver)
                                             for part in (requests[:2], requests[2:])))
            for layer in hp.layers:  # a warm-up on the GPU: the edit moves them out before its values
                if alg == "AlphaEdit":
                    ctx.nullspace(lm, layer, hp, hp.nullspace_threshold)
                else:
                    ctx.covariance(lm, layer, hp)
            monkeypatch.setattr(rome.editor, "optimise_values", on_host_first(ctx, rome.editor.optimise_values))
        first = ALGORITHMS[alg].apply(lm, requests[:2], hp, ctx)
        ctx.state = state_from_tensors(*state_to_tensors(ctx.state))  # as a resumed run has it: host, unpinned
        second = ALGORITHMS[alg].apply(lm, requests[2:], hp, ctx)
        assert first.solver_matrices == second.solver_matrices == where
        kept = kept_matrices(ctx)
        assert kept
        for tensor in kept:
            if where == "host":
                assert tensor.device.type == "cpu" and tensor.is_pinned()
            else:
                assert tensor.device.type == "cuda"
        runs[where] = (first.deltas, second.deltas, ctx.state.get(EDITED_KEYS, {}))
    for device, host in zip(runs["device"], runs["host"]):
        for name in device:
            torch.testing.assert_close(host[name].cpu(), device[name].cpu(), rtol=1e-12, atol=0)
