"""The editing core every algorithm runs: values at the last edited layer, then, layer by layer,
keys from the current model, the remaining residual spread over the layers left, and one solve.

    MEMIT   least squares, several layers        EMMET  equality (+ mu I), one or more layers
    r-ROME  equality, one layer, k* everywhere   ROME   equality, one layer, bare key in residual
    ENCORE  least squares + mu I + K_p K_p^T     AlphaEdit  null-space projection + K_p K_p^T

Algorithms differ only in the hparams and the `Solver` they pass here (each package states its own). Whatever must persist
across edits (templates, statistics, factorised covariances, run state) lives in `EditContext`,
which the caller owns. The run state `EditContext.state` holds tensors and plain values only, so
a driver can checkpoint it (util/state.py); AlphaEdit and ENCORE keep there, per edited module,
K_p K_p^T: the sum of k k^T over the keys every earlier edit of the run wrote into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rome.compute_u import KeyResult, compute_keys
from rome.compute_v import compute_values
from rome.hparams import EditHyperParams
from rome.replay import ReplayRuntime
from rome.templates import context_templates, template_groups
from util.arch import edited_weight, to_stored
from util.corpus import Corpus, resolve_corpus
from util.deltas import Deltas, apply_deltas, snapshot
from util.errors import MemoryBudgetError, ModelLoadError
from util.memory import GIB, HEADROOM, MemoryPlan, ModelShape, SolverPlacement, edit_shape, plan, resident_bytes, solver_matrices
from util.models import DTYPES, LoadedModel, input_device
from util.paths import Caches
from util.requests import EditRequest
from util.solve import Covariance, solve_update
from util.stats import SecondMoment, StatsCache, batch_tokens_for


KEY_CHUNK, VALUE_CHUNK = 256, 64  # requests per key forward / value batch without a memory budget
EDITED_KEYS = "edited_keys"  # EditContext.state[EDITED_KEYS][down projection module] = K_p K_p^T


@dataclass(frozen=True)
class Solver:
    """How an editor solves (util/solve.py): everything edit_layers needs besides the hparams. Each
    editor package states its own in its declaration (rome/declaration.py); the registry
    (editors.py) reads it to plan memory without editing.

    constraint: "least_squares", "equality" or "nullspace". remember_keys: the run's earlier keys
    K_p K_p^T enter each system (AlphaEdit, ENCORE). site: where the target value lives, "layer"
    (the last edited layer's output, MEMIT) or "mlp" (the down projection's output, ROME). mu: the
    hparams key of each system's multiple of I (EMMET's emmet_lambda, ENCORE's update_norm_lambda,
    AlphaEdit's L2), applied from `mu_from` requests on (EMMET: 2). threshold: the hparams key of the
    null space's eigenvalue cut. bare_key_residual: the original ROME's keys. residual_from: where
    the residual is taken, "bare_prompt" or "key_average", or a function of the hparams giving one."""
    constraint: str
    remember_keys: bool = False
    site: str = "layer"
    mu: str | None = None
    mu_from: int = 1
    threshold: str | None = None
    bare_key_residual: bool = False
    residual_from: str | Callable[[Any], str] = "bare_prompt"

    def matrices(self, hparams: EditHyperParams) -> tuple[int, int]:
        """The m x m float64 matrices it keeps per edited layer and needs while solving one."""
        return solver_matrices(self.constraint, hparams.mom2_adjustment, self.remember_keys)

    def keywords(self, hparams: EditHyperParams, n_requests: int) -> dict[str, Any]:
        """What edit_layers solves with for `n_requests` requests under `hparams`."""
        mu = getattr(hparams, self.mu) if self.mu is not None and n_requests >= self.mu_from else 0.0
        return {"mu": mu, "site": self.site, "bare_key_residual": self.bare_key_residual,
                "nullspace_threshold": getattr(hparams, self.threshold) if self.threshold else None,
                "residual_from": self.residual_from(hparams) if callable(self.residual_from) else self.residual_from}


def plan_edit(lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams, templates: list[str], value_dtype: str,
              budget_gib: float, matrices: tuple[int, int], weights: int | None = None) -> MemoryPlan:
    """util/memory.py's plan of one edit of `requests` within `budget_gib` (`weights`: the model's
    bytes, for a model built on the 'meta' device)."""
    shape = edit_shape(lm.tok, requests, templates, hparams.kl_prompts, hparams.v_loss_layer, hparams.layers[-1])
    autocast = None if value_dtype == "float32" else DTYPES[value_dtype]
    replayed = [lm.model.get_submodule(lm.arch.layer(j)) for j in range(hparams.layers[-1] + 1, hparams.v_loss_layer + 1)]
    return plan(lm.model, ModelShape.of(lm), shape, budget_gib, autocast, [*replayed, lm.model.get_submodule(lm.arch.unembed)],
                len(hparams.layers), matrices, lm.name, weights=weights)


@dataclass
class EditContext:
    """State owned by the caller and reused across edits of one run."""

    # the cache folders of templates, sampled corpora, corpus file hashes and statistics; the
    # caller reads them from the environment at its edge (util/environment.py, Environment.caches)
    caches: Caches
    seed: int = 0
    # statistics corpus; None: Wikipedia when online, else text sampled from the model. The caller
    # resolves $KEDIT_CORPUS (util/environment.py) and passes it here
    corpus_path: str | None = None
    offline: bool = False  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: never try Wikipedia
    stats: StatsCache | None = None  # None: a StatsCache under caches.stats
    fast: bool = True  # fast value optimisation (see rome/compute_v.py)
    # "bfloat16": value optimisation's replayed layers in mixed precision (several times faster on
    # CPUs with avx512_bf16/AMX and on GPUs; values close to, not equal to, float32 ones)
    value_dtype: str = "float32"
    # with a mixed-precision value_dtype on Llama models: torch.compile the replayed layers
    # (rome.llama_layer.llama_layer; compiled in the first calls of a runtime, up to ~1.5 min on a 2-core CPU)
    value_compile: bool = False
    # value steps between the host's reads of which requests still run (rome/compute_v.py); None:
    # every step on a CPU, compute_v.SYNC_EVERY on an accelerator. The values do not depend on it
    value_sync_every: int | None = None
    # requests per padded key forward and per value optimisation batch: bound an edit's activation
    # memory at large batches (results equal to one chunk's up to rounding). None: derived from
    # max_gpu_memory when it is given, else KEY_CHUNK / VALUE_CHUNK
    key_chunk_size: int | None = None
    value_chunk_size: int | None = None
    # GiB of device memory an edit may hold, weights included (--max_gpu_memory): the chunk sizes and
    # the statistics batch follow from it by util/memory.py's estimate; explicit chunk sizes win
    max_gpu_memory: float | None = None
    state: dict[str, Any] = field(default_factory=dict)  # per-run editor state, checkpointed
    # what value optimisation keeps across edits: the compiled layer function, the float32
    # attention given to transformers (rome/replay.py); share one between contexts to compile once
    replay: ReplayRuntime = field(default_factory=ReplayRuntime, repr=False)
    _templates: dict = field(default_factory=dict, repr=False)
    _covariances: dict = field(default_factory=dict, repr=False)
    _nullspaces: dict = field(default_factory=dict, repr=False)
    _corpus: Corpus | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = StatsCache(self.caches.stats)

    def templates(self, lm: LoadedModel, hparams: EditHyperParams) -> list[str]:
        key = (lm.name, self.seed, str(hparams.context_template_length_params))
        if key not in self._templates:
            self._templates[key] = context_templates(lm, hparams.context_template_length_params, self.seed, self.caches.templates)
        return self._templates[key]

    def corpus(self, lm: LoadedModel, hparams: EditHyperParams) -> Corpus:
        if self._corpus is None:
            n_tokens = hparams.mom2_n_samples * hparams.mom2_sample_tokens
            self._corpus = resolve_corpus(self.corpus_path, lm.model, lm.tok, lm.name, n_tokens, self.seed,
                                         offline=self.offline, caches=self.caches)
        return self._corpus

    def moments(self, lm: LoadedModel, hparams: EditHyperParams) -> dict[int, SecondMoment]:
        """C0 of every edited layer with its cache key, computed in one pass where missing."""
        return self.stats.second_moments(
            lm, hparams.layers, self.corpus(lm, hparams), hparams.mom2_n_samples,
            hparams.mom2_sample_tokens, hparams.mom2_dtype,
            batch_tokens=None if self.max_gpu_memory is None else lambda n_layers: self._stats_batch_tokens(lm, hparams, n_layers),
        )

    def _stats_batch_tokens(self, lm: LoadedModel, hparams: EditHyperParams, n_layers: int) -> int:
        """Tokens per statistics batch of `n_layers` within max_gpu_memory."""
        free = int(self.max_gpu_memory * GIB * HEADROOM) - resident_bytes(lm.model)
        device = input_device(lm.model)
        if device.type == "cuda":
            free = min(free, torch.cuda.mem_get_info(device)[0])
        tokens = batch_tokens_for(lm, n_layers, hparams.mom2_dtype, hparams.mom2_sample_tokens, free)
        if tokens < hparams.mom2_sample_tokens:
            raise MemoryBudgetError(f"max_gpu_memory {self.max_gpu_memory:.3g} GiB cannot hold one key-statistics window "
                                    f"of {hparams.mom2_sample_tokens} tokens of {lm.name} at layers {hparams.layers}")
        return tokens

    def chunk_sizes(self, lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams,
                    matrices: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Requests per key forward and per value optimisation batch (`edit_plan`)."""
        key_chunk, value_chunk, _ = self.edit_plan(lm, requests, hparams, matrices)
        return key_chunk, value_chunk

    def edit_plan(self, lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams,
                  matrices: tuple[int, int] = (0, 0)) -> tuple[int, int, bool]:
        """(requests per key forward, per value optimisation batch, whether the solver's kept matrices
        live in host memory): the explicit chunk sizes, else what fits in max_gpu_memory
        (util/memory.py's plan, which also places the matrices; `matrices`: m x m float64 matrices
        the solver keeps per edited layer and needs while solving one, util.memory.solver_matrices;
        none when nothing is solved), else KEY_CHUNK / VALUE_CHUNK on the device."""
        if self.max_gpu_memory is None:
            return self.key_chunk_size or KEY_CHUNK, self.value_chunk_size or VALUE_CHUNK, False
        budget = plan_edit(lm, requests, hparams, self.templates(lm, hparams), self.value_dtype, self.max_gpu_memory, matrices)
        return self.key_chunk_size or budget.key_chunk(), self.value_chunk_size or budget.value_chunk(), budget.host

    def placement(self, lm: LoadedModel, layer: int, host: bool) -> SolverPlacement:
        """Where the solver's matrices of `layer` are kept (`edit_plan` says whether in host memory)."""
        return SolverPlacement(edited_weight(lm.model, lm.arch, layer).device, host)

    def keep_solver_matrices(self, lm: LoadedModel, host: bool) -> None:
        """Move every matrix the solver keeps for `lm` (C and its factor, U, K_p K_p^T of any layer)
        to where an edit's plan puts them, before its value optimisation counts on the room that leaves
        (an earlier edit, or a benchmark's warm-up, may have kept them elsewhere)."""
        modules = {lm.arch.down_proj(layer): layer for layer in range(lm.model.config.num_hidden_layers)}
        for (name, layer, *_), cov in self._covariances.items():  # keys: (model, layer, ...)
            if name == lm.name:
                cov.kept(self.placement(lm, layer, host).keep)
        for key, basis in self._nullspaces.items():
            if key[0] == lm.name:
                self._nullspaces[key] = self.placement(lm, key[1], host).keep(basis)
        grams = self.state.get(EDITED_KEYS, {})
        for module, gram in grams.items():
            if module in modules:
                grams[module] = self.placement(lm, modules[module], host).keep(gram)

    def second_moments(self, lm: LoadedModel, hparams: EditHyperParams) -> dict[int, torch.Tensor]:
        """C0 of every edited layer, computed in one pass where missing."""
        return {layer: moment.mom2 for layer, moment in self.moments(lm, hparams).items()}

    def covariance(self, lm: LoadedModel, layer: int, hparams: EditHyperParams, host: bool = False) -> Covariance:
        """C = mom2_update_weight * C0 (or I without mom2 adjustment) and its factor, kept on the edited
        weight's device or, with `host`, in host memory (moved there when an earlier edit kept it
        elsewhere); built once per run, factorised on the weight's device at its first solve."""
        weight = edited_weight(lm.model, lm.arch, layer)
        if not hparams.mom2_adjustment:
            return Covariance(weight.shape[1], layer=lm.arch.down_proj(layer))
        placement = self.placement(lm, layer, host)
        key = (lm.name, layer, hparams.mom2_update_weight, hparams.mom2_n_samples, hparams.mom2_sample_tokens,
               hparams.mom2_dtype, weight.device)
        if key not in self._covariances:
            mom2 = self.second_moments(lm, hparams)[layer].to(placement.kept_on)
            self._covariances[key] = Covariance(weight.shape[1], mom2, hparams.mom2_update_weight, layer=lm.arch.down_proj(layer))
        return self._covariances[key].kept(placement.keep)

    def nullspace(self, lm: LoadedModel, layer: int, hparams: EditHyperParams, threshold: float, host: bool = False) -> torch.Tensor:
        """AlphaEdit's null-space basis U of C0 at `layer` (P = U U^T), kept on the edited weight's
        device or, with `host`, in host memory: from the statistics cache (util/stats.py keeps it on
        disk next to C0), else computed on the weight's device (an eigendecomposition of m x m:
        seconds on a GPU, minutes on a CPU) and cached."""
        placement = self.placement(lm, layer, host)
        key = (lm.name, layer, threshold, hparams.mom2_n_samples, hparams.mom2_sample_tokens, hparams.mom2_dtype, placement.device)
        if key not in self._nullspaces:
            self._nullspaces[key] = self.stats.nullspace(self.moments(lm, hparams)[layer], threshold, placement.device)
        self._nullspaces[key] = placement.keep(self._nullspaces[key])
        return self._nullspaces[key]

    def edited_keys(self, lm: LoadedModel, layer: int, host: bool = False) -> torch.Tensor | None:
        """K_p K_p^T (float64, m x m) of the keys earlier edits wrote into `layer`, None before any;
        kept where `placement(lm, layer, host)` says (a sum restored from a checkpoint moves there once)."""
        grams = self.state.get(EDITED_KEYS, {})
        name = lm.arch.down_proj(layer)
        if name in grams:
            grams[name] = self.placement(lm, layer, host).keep(grams[name])
        return grams.get(name)

    def remember_keys(self, lm: LoadedModel, layer: int, keys: torch.Tensor, host: bool = False) -> None:
        """Add K K^T of this edit's keys (m x n, on the edited weight's device, where the product is
        formed) to the run's K_p K_p^T at `layer`; the sum is accumulated where it is kept."""
        placement = self.placement(lm, layer, host)
        grams = self.state.setdefault(EDITED_KEYS, {})
        name = lm.arch.down_proj(layer)
        gram = keys.double() @ keys.double().T
        grams[name] = placement.keep(gram) if name not in grams else placement.add(grams[name], gram)


@dataclass
class EditResult:
    deltas: Deltas  # parameter name -> change, in the parameter's orientation
    originals: dict[str, torch.Tensor]  # the parameters before this edit (exact undo)
    requests: list[dict]  # per request: value optimisation record
    layers: list[dict]  # per layer: update norms, residual, solve time
    value_deltas: torch.Tensor  # (n, d) the optimised residual change per request
    chunk_sizes: dict[str, int] = field(default_factory=dict)  # requests per key forward / value batch
    solver_matrices: str = "device"  # where the solver's kept matrices live: "device" or "host" (memory)


def edit_keys(lm: LoadedModel, requests: list[EditRequest], layers: list[int], hparams: EditHyperParams,
              ctx: EditContext, site: str | None = None, chunk_size: int | None = None) -> KeyResult:
    """The keys an edit solves with: the context's templates, averaged as `hparams.key_average` says.
    chunk_size: requests per forward (None: the context's, EditContext.chunk_sizes)."""
    groups = template_groups(hparams.context_template_length_params, hparams.key_average)
    return compute_keys(lm, requests, layers, ctx.templates(lm, hparams), hparams.fact_token, site=site, groups=groups,
                        chunk_size=chunk_size or ctx.chunk_sizes(lm, requests, hparams)[0])


def edit_layers(lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams, ctx: EditContext, solver: Solver) -> EditResult:
    """Compute and apply the update for `requests` at hparams.layers as `solver` says; returns the deltas.

    solver.site: where the target value lives: "layer" (the last edited layer's output, MEMIT) or
    "mlp" (the down projection's output, ROME). The target is v* = (site output at the bare
    prompt) + delta; the residual is v* minus the site's current output at the bare prompt
    (residual_from "bare_prompt": ROME, MEMIT and its successors) or averaged over the templates
    like k* ("key_average": r-ROME's code, so that W' k* = v*). bare_key_residual: the original ROME's keys.
    solver.remember_keys: add the run's K_p K_p^T (ctx.state) to each layer's system, and this edit's
    keys to it once every layer is solved (AlphaEdit, ENCORE). The keys at a layer do not depend
    on that layer's or later layers' updates, so the keys solved for equal the edited model's
    keys, which the AlphaEdit release recomputes after the edit. nullspace_threshold: for the
    "nullspace" constraint, the eigenvalue cut of C0."""
    constraint, remember_keys = solver.constraint, solver.remember_keys
    keywords = solver.keywords(hparams, len(requests))
    mu, site, bare_key_residual = keywords["mu"], keywords["site"], keywords["bare_key_residual"]
    nullspace_threshold, residual_from = keywords["nullspace_threshold"], keywords["residual_from"]
    if constraint == "nullspace" and nullspace_threshold is None:
        raise ValueError("the nullspace constraint needs nullspace_threshold")
    hparams.check_model(lm.model.config.num_hidden_layers)
    check_editable(lm, hparams.layers)
    templates = ctx.templates(lm, hparams)
    layers = hparams.layers
    site_module = lm.arch.down_proj(layers[-1]) if site == "mlp" else lm.arch.layer(layers[-1])
    autocast = None if ctx.value_dtype == "float32" else DTYPES[ctx.value_dtype]
    key_chunk, value_chunk, host = ctx.edit_plan(lm, requests, hparams,
                                                 solver.matrices(hparams))
    ctx.keep_solver_matrices(lm, host)
    values = compute_values(lm, requests, layers[-1], templates, hparams, site=site, fast=ctx.fast, autocast=autocast,
                            compiled=ctx.value_compile, chunk_size=value_chunk, runtime=ctx.replay,
                            sync_every=ctx.value_sync_every)
    targets = values.target
    names = [lm.arch.weight_name(layer) for layer in layers]
    originals = snapshot(lm.model, names)
    deltas: Deltas = {}
    layer_records, solved_keys = [], []
    for i, layer in enumerate(layers):
        keys = edit_keys(lm, requests, [layer], hparams, ctx, site=site_module, chunk_size=key_chunk)
        weight = edited_weight(lm.model, lm.arch, layer).double()
        device = weight.device  # solve where the matrix lives (a GPU under a device map), in float64
        k_star = keys.k_star[layer].to(device, torch.float64).T  # m x n
        current = keys.site_output if residual_from == "bare_prompt" else keys.site_mean
        residual = (targets.to(device, torch.float64) - current.to(device, torch.float64)).T / (len(layers) - i)  # d x n
        k_constraint = keys.k_bare[layer].to(device, torch.float64).T if bare_key_residual else k_star
        cov = None if constraint == "nullspace" else ctx.covariance(lm, layer, hparams, host)  # AlphaEdit needs only U
        # kept matrices in host memory are moved in by the solve and freed with its locals
        delta, info = solve_update(
            residual, k_constraint, cov, constraint, mu=mu,
            K_dir=k_star if bare_key_residual else None, layer=lm.arch.down_proj(layer),
            prior=ctx.edited_keys(lm, layer, host) if remember_keys else None,
            basis=ctx.nullspace(lm, layer, hparams, nullspace_threshold, host) if constraint == "nullspace" else None,
        )
        layer_records.append({**_layer_record(layer, delta, weight, k_constraint, residual, info.seconds), **info.extras})
        solved_keys.append(k_constraint)
        stored = to_stored(lm.arch, delta).to(lm.model.get_parameter(names[i]).dtype)
        apply_deltas(lm.model, {names[i]: stored})  # on the weight's device: no round trip through the host
        deltas[names[i]] = stored.cpu()
    if remember_keys:
        for layer, keys in zip(layers, solved_keys):
            ctx.remember_keys(lm, layer, keys, host)
    request_records = [
        {"case_id": r.case_id, "v_steps": values.steps[j], "v_loss": values.final_loss[j],
         "v_target_prob": values.target_prob[j], "delta_ratio": values.delta_ratio[j]}
        for j, r in enumerate(requests)
    ]
    return EditResult(deltas, originals, request_records, layer_records, values.delta, {"keys": key_chunk, "values": value_chunk},
                      "host" if host else "device")


def check_editable(lm: LoadedModel, layers: list[int]) -> None:
    """Refuse, before any work, a layer whose weight accelerate has offloaded (a 'meta' tensor:
    the values live in host memory or on disk and are streamed in per forward, so an in-place
    update would be lost or fail deep in torch)."""
    for layer in layers:
        if edited_weight(lm.model, lm.arch, layer).device.type == "meta":
            raise ModelLoadError(
                f"layer {lm.arch.weight_name(layer)} is offloaded by accelerate (a 'meta' weight) and cannot be edited "
                f"in place; load the model with --device cuda or cpu, or on more GPU memory so that the edited layers stay on a device"
            )


def _layer_record(layer: int, delta: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, residual: torch.Tensor, seconds: float) -> dict:
    """||Delta||_F, ||Delta|| / ||W||, and the least-squares residual ||(W+Delta)K - V|| / ||V||
    with V = W K + R, the values this layer was asked to produce."""
    wanted = weight @ keys + residual
    return {
        "layer": layer,
        "delta_norm": delta.norm().item(),
        "delta_rel": (delta.norm() / weight.norm()).item(),
        "lsq_residual": ((weight + delta) @ keys - wanted).norm().item() / wanted.norm().item(),
        "solve_seconds": seconds,
    }
