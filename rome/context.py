"""What an editing run keeps across its edits, one object per lifetime, all held by `EditContext`:

    config     EditConfig   what the caller chose, fixed for the run (cache folders, seed, corpus,
                            value precision, chunk sizes, the memory budget)
    cache      Computed     what is computed once and reused: templates, the statistics corpus, C0
                            and C with its factor, AlphaEdit's null spaces, the replay runtime
    placement  EditPlan     the current edit's plan: requests per key forward and value batch, and
                            whether the solver's kept matrices live in host memory
    run        RunState     the editors' run state (`state`): tensors and plain values only, so that
                            a driver can checkpoint it (util/state.py); AlphaEdit and ENCORE keep
                            there, per edited module, K_p K_p^T of the keys earlier edits wrote

`close()` (or leaving a `with EditContext(...)` block) gives back what the replays registered
in transformers (rome/values/replay.py's ReplayRuntime).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from rome.compute_v import ValueSettings
from rome.hparams import EditHyperParams
from rome.templates import context_templates
from rome.values.layout import Batch, build_batch
from rome.value_cache import ValueCache
from rome.values.replay import ReplayRuntime
from util.arch import edited_weight
from util.corpus import Corpus, resolve_corpus
from util.errors import MemoryBudgetError
from util.memory import GIB, HEADROOM, MemoryPlan, ModelShape, SolverPlacement, plan, resident_bytes
from util.models import DTYPES, LoadedModel, input_device
from util.paths import Caches
from util.requests import EditRequest
from util.solve import Covariance
from util.stats import SecondMoment, StatsCache, batch_tokens_for

KEY_CHUNK, VALUE_CHUNK = 256, 64  # requests per key forward / value batch without a memory budget
EDITED_KEYS = "edited_keys"  # EditContext.state[EDITED_KEYS][down projection module] = K_p K_p^T


@dataclass(frozen=True)
class EditConfig:
    # the cache folders of templates, sampled corpora, corpus file hashes and statistics; the
    # caller reads them from the environment at its edge (util/environment.py, Environment.caches)
    caches: Caches
    seed: int = 0
    # statistics corpus; None: Wikipedia when online, else text sampled from the model. The caller
    # resolves $KEDIT_CORPUS (util/environment.py) and passes it here
    corpus_path: str | None = None
    offline: bool = False  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: never try Wikipedia
    fast: bool = True  # fast value optimisation (see rome/compute_v.py)
    # "bfloat16": value optimisation's replayed layers in mixed precision (several times faster on
    # CPUs with avx512_bf16/AMX and on GPUs; values close to, not equal to, float32 ones)
    value_dtype: str = "float32"
    # on plain Llama models: torch.compile the replayed layers (rome.values.llama_layer.llama_layer;
    # compiled in the first calls of a runtime, ~1-1.5 min on a 2-core CPU)
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
    # reuse target values optimised before for the same weights, request, templates and value
    # hparams, and keep new ones (caches.values, rome/value_cache.py)
    value_cache: bool = False

    @property
    def autocast(self) -> torch.dtype | None:
        return None if self.value_dtype == "float32" else DTYPES[self.value_dtype]

    def value_settings(self, chunk_size: int | None = None) -> ValueSettings:
        return ValueSettings(self.fast, chunk_size or self.value_chunk_size or VALUE_CHUNK, self.autocast, self.value_compile,
                             self.value_sync_every)


@dataclass(frozen=True)
class EditPlan:
    """One edit's placement: requests per key forward and per value batch, and whether the solver's
    kept matrices (C and its factor, U, K_p K_p^T) live in host memory (util/memory.py's plan)."""
    key_chunk: int = KEY_CHUNK
    value_chunk: int = VALUE_CHUNK
    host: bool = False

    def solver(self, lm: LoadedModel, layer: int) -> SolverPlacement:
        """Where the solver's matrices of `layer` are kept."""
        return SolverPlacement(edited_weight(lm.model, lm.arch, layer).device, self.host)


def plan_edit(lm: LoadedModel, batch: Batch, hparams: EditHyperParams, value_dtype: str, budget_gib: float,
              matrices: tuple[int, int], weights: int | None = None) -> MemoryPlan:
    """util/memory.py's plan of one edit of `batch` (its layout gives the rows and reads) within
    `budget_gib` (`weights`: the model's bytes, for a model built on the 'meta' device)."""
    shape = batch.shape(hparams.v_loss_layer, hparams.layers[-1])
    autocast = None if value_dtype == "float32" else DTYPES[value_dtype]
    replayed = [lm.model.get_submodule(lm.arch.layer(j)) for j in range(hparams.layers[-1] + 1, hparams.v_loss_layer + 1)]
    return plan(lm.model, ModelShape.of(lm), shape, budget_gib, autocast, [*replayed, lm.model.get_submodule(lm.arch.unembed)],
                len(hparams.layers), matrices, lm.name, weights=weights)


class Computed:
    """What a run computes once and reuses: context templates, the statistics corpus, C0 (through
    `stats`), C with its factor and AlphaEdit's null spaces (kept where the placement says), and the
    replay runtime (the compiled layer function, the attention given to transformers)."""

    def __init__(self, caches: Caches, stats: StatsCache | None, replay: ReplayRuntime | None):
        self.stats = stats or StatsCache(caches.stats)
        self.replay = replay or ReplayRuntime()
        self.templates: dict[tuple, list[str]] = {}
        self.covariances: dict[tuple, Covariance] = {}
        self.nullspaces: dict[tuple, torch.Tensor] = {}
        self.corpus: Corpus | None = None
        self.values = ValueCache(caches.values)

    def keep(self, lm: LoadedModel, placement: EditPlan) -> None:
        """Move `lm`'s C, its factor and null spaces to where `placement` keeps them."""
        for (name, layer, *_), cov in self.covariances.items():  # keys: (model, layer, ...)
            if name == lm.name:
                cov.kept(placement.solver(lm, layer).keep)
        for key, basis in self.nullspaces.items():
            if key[0] == lm.name:
                self.nullspaces[key] = placement.solver(lm, key[1]).keep(basis)


class RunState:
    """The editors' run state: `values` (EditContext.state) is what a checkpoint saves."""

    def __init__(self, values: dict[str, Any] | None = None):
        self.values: dict[str, Any] = {} if values is None else values

    def edited_keys(self, module: str, placement: SolverPlacement) -> torch.Tensor | None:
        grams = self.values.get(EDITED_KEYS, {})
        if module in grams:
            grams[module] = placement.keep(grams[module])
        return grams.get(module)

    def remember_keys(self, module: str, keys: torch.Tensor, placement: SolverPlacement) -> None:
        grams = self.values.setdefault(EDITED_KEYS, {})
        gram = keys.double() @ keys.double().T
        grams[module] = placement.keep(gram) if module not in grams else placement.add(grams[module], gram)

    def keep(self, lm: LoadedModel, placement: EditPlan) -> None:
        """Move `lm`'s K_p K_p^T sums to where `placement` keeps them."""
        modules = {lm.arch.down_proj(layer): layer for layer in range(lm.model.config.num_hidden_layers)}
        grams = self.values.get(EDITED_KEYS, {})
        for module, gram in grams.items():
            if module in modules:
                grams[module] = placement.solver(lm, modules[module]).keep(gram)


class EditContext:
    """The state owned by the caller and reused across edits of one run (see the module docstring).
    EditContext(caches, seed=..., ...) takes EditConfig's fields; `stats` and `replay` share a
    StatsCache or a ReplayRuntime (compiled once) between contexts; `state`: a run state to go on
    from (a checkpoint's)."""

    def __init__(self, caches: Caches, *, stats: StatsCache | None = None, replay: ReplayRuntime | None = None,
                 state: dict[str, Any] | None = None, **config):
        self.config = EditConfig(caches, **config)
        self.cache = Computed(caches, stats, replay)
        self.placement = EditPlan(self.config.key_chunk_size or KEY_CHUNK, self.config.value_chunk_size or VALUE_CHUNK)
        self.run = RunState(state)

    def configure(self, **changes) -> None:
        """Change the configuration between edits (e.g. the memory budget)."""
        self.config = replace(self.config, **changes)

    @property
    def state(self) -> dict[str, Any]:
        return self.run.values

    @state.setter
    def state(self, values: dict[str, Any]) -> None:
        self.run.values = values

    @property
    def replay(self) -> ReplayRuntime:
        return self.cache.replay

    @property
    def value_cache(self) -> ValueCache | None:
        """The values kept on disk, when the configuration asks for them (its hit counts run-long)."""
        return self.cache.values if self.config.value_cache else None

    def close(self) -> None:
        """Give back what the replays registered in transformers (the context stays usable)."""
        self.cache.replay.close()

    def __enter__(self) -> "EditContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # caches

    def templates(self, lm: LoadedModel, hparams: EditHyperParams) -> list[str]:
        key = (lm.name, self.config.seed, str(hparams.context_template_length_params))
        if key not in self.cache.templates:
            self.cache.templates[key] = context_templates(lm, hparams.context_template_length_params, self.config.seed,
                                                          self.config.caches.templates)
        return self.cache.templates[key]

    def corpus(self, lm: LoadedModel, hparams: EditHyperParams) -> Corpus:
        if self.cache.corpus is None:
            config, n_tokens = self.config, hparams.mom2_n_samples * hparams.mom2_sample_tokens
            self.cache.corpus = resolve_corpus(config.corpus_path, lm.model, lm.tok, lm.name, n_tokens, config.seed,
                                               offline=config.offline, caches=config.caches)
        return self.cache.corpus

    def moments(self, lm: LoadedModel, hparams: EditHyperParams) -> dict[int, SecondMoment]:
        """C0 of every edited layer with its cache key, computed in one pass where missing."""
        return self.cache.stats.second_moments(
            lm, hparams.layers, self.corpus(lm, hparams), hparams.mom2_n_samples,
            hparams.mom2_sample_tokens, hparams.mom2_dtype,
            batch_tokens=None if self.config.max_gpu_memory is None else lambda n_layers: self._stats_batch_tokens(lm, hparams, n_layers),
        )

    def _stats_batch_tokens(self, lm: LoadedModel, hparams: EditHyperParams, n_layers: int) -> int:
        """Tokens per statistics batch of `n_layers` within max_gpu_memory."""
        budget = self.config.max_gpu_memory
        free = int(budget * GIB * HEADROOM) - resident_bytes(lm.model)
        device = input_device(lm.model)
        if device.type == "cuda":
            free = min(free, torch.cuda.mem_get_info(device)[0])
        tokens = batch_tokens_for(lm, n_layers, hparams.mom2_dtype, hparams.mom2_sample_tokens, free)
        if tokens < hparams.mom2_sample_tokens:
            raise MemoryBudgetError(f"max_gpu_memory {budget:.3g} GiB cannot hold one key-statistics window "
                                    f"of {hparams.mom2_sample_tokens} tokens of {lm.name} at layers {hparams.layers}")
        return tokens

    def second_moments(self, lm: LoadedModel, hparams: EditHyperParams) -> dict[int, torch.Tensor]:
        """C0 of every edited layer, computed in one pass where missing."""
        return {layer: moment.mom2 for layer, moment in self.moments(lm, hparams).items()}

    def covariance(self, lm: LoadedModel, layer: int, hparams: EditHyperParams) -> Covariance:
        """C = mom2_update_weight * C0 (or I without mom2 adjustment) and its factor, kept where the
        placement says (moved there when an earlier edit kept it elsewhere); built once per run,
        factorised on the weight's device at its first solve."""
        weight = edited_weight(lm.model, lm.arch, layer)
        if not hparams.mom2_adjustment:
            return Covariance(weight.shape[1], layer=lm.arch.down_proj(layer))
        placement = self.placement.solver(lm, layer)
        key = (lm.name, layer, hparams.mom2_update_weight, hparams.mom2_n_samples, hparams.mom2_sample_tokens,
               hparams.mom2_dtype, weight.device)
        if key not in self.cache.covariances:
            mom2 = self.second_moments(lm, hparams)[layer].to(placement.kept_on)
            self.cache.covariances[key] = Covariance(weight.shape[1], mom2, hparams.mom2_update_weight, layer=lm.arch.down_proj(layer))
        return self.cache.covariances[key].kept(placement.keep)

    def nullspace(self, lm: LoadedModel, layer: int, hparams: EditHyperParams, threshold: float) -> torch.Tensor:
        """AlphaEdit's null-space basis U of C0 at `layer` (P = U U^T), kept where the placement says:
        from the statistics cache (util/stats.py keeps it on disk next to C0), else computed on the
        weight's device (an eigendecomposition of m x m: seconds on a GPU, minutes on a CPU) and cached."""
        placement = self.placement.solver(lm, layer)
        key = (lm.name, layer, threshold, hparams.mom2_n_samples, hparams.mom2_sample_tokens, hparams.mom2_dtype, placement.device)
        if key not in self.cache.nullspaces:
            self.cache.nullspaces[key] = self.cache.stats.nullspace(self.moments(lm, hparams)[layer], threshold, placement.device)
        self.cache.nullspaces[key] = placement.keep(self.cache.nullspaces[key])
        return self.cache.nullspaces[key]

    # placement

    def plan(self, lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams, matrices: tuple[int, int] = (0, 0),
             batch: Batch | None = None) -> EditPlan:
        """The explicit chunk sizes, else what fits in max_gpu_memory (util/memory.py's plan of the
        requests' layout, `batch` when given, which also places the kept matrices; `matrices`: m x m
        float64 matrices the solver keeps per edited layer and needs while solving one,
        util.memory.solver_matrices; none when nothing is solved), else KEY_CHUNK / VALUE_CHUNK on the device."""
        config = self.config
        if config.max_gpu_memory is None:
            return EditPlan(config.key_chunk_size or KEY_CHUNK, config.value_chunk_size or VALUE_CHUNK)
        batch = batch or build_batch(lm, requests, self.templates(lm, hparams), hparams)
        budget = plan_edit(lm, batch, hparams, config.value_dtype, config.max_gpu_memory, matrices)
        return EditPlan(config.key_chunk_size or budget.key_chunk(), config.value_chunk_size or budget.value_chunk(), budget.host)

    def place(self, lm: LoadedModel, placement: EditPlan) -> None:
        """Make `placement` the current one and move every matrix the solver keeps for `lm` (C and its
        factor, U, K_p K_p^T of any layer) where it says, before an edit's value optimisation counts on
        the room that leaves (an earlier edit, or a benchmark's warm-up, may have kept them elsewhere)."""
        self.placement = placement
        self.cache.keep(lm, placement)
        self.run.keep(lm, placement)

    # run state

    def edited_keys(self, lm: LoadedModel, layer: int) -> torch.Tensor | None:
        """K_p K_p^T (float64, m x m) of the keys earlier edits wrote into `layer`, None before any;
        kept where the placement says (a sum restored from a checkpoint moves there once)."""
        return self.run.edited_keys(lm.arch.down_proj(layer), self.placement.solver(lm, layer))

    def remember_keys(self, lm: LoadedModel, layer: int, keys: torch.Tensor) -> None:
        """Add K K^T of this edit's keys (m x n, on the edited weight's device, where the product is
        formed) to the run's K_p K_p^T at `layer`; the sum is accumulated where it is kept."""
        self.run.remember_keys(lm.arch.down_proj(layer), keys, self.placement.solver(lm, layer))
