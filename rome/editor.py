"""The editing core every algorithm runs: values at the last edited layer, then, layer by layer,
keys from the current model, the remaining residual spread over the layers left, and one solve.

    MEMIT   least squares, several layers        EMMET  equality (+ mu I), one or more layers
    r-ROME  equality, one layer, k* everywhere   ROME   equality, one layer, bare key in residual
    ENCORE  least squares + mu I + K_p K_p^T     AlphaEdit  null-space projection + K_p K_p^T

Algorithms differ only in the hparams and the `Solver` they pass here (each package states its own). Whatever must persist
across edits (configuration, templates, statistics, factorised covariances, the edit's placement,
run state) lives in `EditContext` (rome/context.py), which the caller owns; AlphaEdit and ENCORE
keep in its run state, per edited module, K_p K_p^T: the sum of k k^T over the keys every earlier
edit of the run wrote into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from rome.compute_u import KeyResult, compute_keys
from rome.compute_v import ValueResult, optimise_values
from rome.context import EDITED_KEYS, KEY_CHUNK, VALUE_CHUNK, EditContext, EditPlan, plan_edit
from rome.hparams import EditHyperParams
from rome.templates import template_groups
from rome.value_cache import values_through_cache
from rome.values.layout import build_batch
from util.arch import edited_weight, to_stored
from util.deltas import Deltas, apply_deltas, snapshot
from util.errors import ModelLoadError
from util.memory import solver_matrices
from util.models import LoadedModel
from util.requests import EditRequest
from util.solve import solve_update

__all__ = ["EDITED_KEYS", "KEY_CHUNK", "VALUE_CHUNK", "EditContext", "EditPlan", "EditResult", "Solver", "edit_keys", "edit_layers",
           "plan_edit"]


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

    def constants(self) -> tuple[str, ...]:
        """The hparams keys only the solve reads (the value cache's key leaves them out)."""
        return tuple(name for name in (self.mu, self.threshold) if name is not None)

    def keywords(self, hparams: EditHyperParams, n_requests: int) -> dict[str, Any]:
        """What edit_layers solves with for `n_requests` requests under `hparams`."""
        mu = getattr(hparams, self.mu) if self.mu is not None and n_requests >= self.mu_from else 0.0
        return {"mu": mu, "site": self.site, "bare_key_residual": self.bare_key_residual,
                "nullspace_threshold": getattr(hparams, self.threshold) if self.threshold else None,
                "residual_from": self.residual_from(hparams) if callable(self.residual_from) else self.residual_from}


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
    chunk_size: requests per forward (None: the context's plan, EditContext.plan)."""
    groups = template_groups(hparams.context_template_length_params, hparams.key_average)
    return compute_keys(lm, requests, layers, ctx.templates(lm, hparams), hparams.fact_token, site=site, groups=groups,
                        chunk_size=chunk_size or ctx.plan(lm, requests, hparams).key_chunk)


@dataclass(frozen=True)
class _Edit:
    """What every layer's step of one edit shares (edit_layers' arguments, the targets, the plan)."""
    lm: LoadedModel
    requests: list[EditRequest]
    hparams: EditHyperParams
    ctx: EditContext
    solver: Solver
    mu: float
    site_module: str  # where the target value lives (the last edited layer's output or down projection)
    bare_key_residual: bool
    nullspace_threshold: float | None
    residual_from: str
    targets: torch.Tensor  # (n, d) v*
    key_chunk: int


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
    keywords = solver.keywords(hparams, len(requests))
    mu, site, bare_key_residual = keywords["mu"], keywords["site"], keywords["bare_key_residual"]
    nullspace_threshold, residual_from = keywords["nullspace_threshold"], keywords["residual_from"]
    if solver.constraint == "nullspace" and nullspace_threshold is None:
        raise ValueError("the nullspace constraint needs nullspace_threshold")
    hparams.check_model(lm.model.config.num_hidden_layers)
    check_editable(lm, hparams.layers)
    layers, settings = hparams.layers, ctx.config.value_settings()
    batch = build_batch(lm, requests, ctx.templates(lm, hparams), hparams, settings.kinds)
    placement = ctx.plan(lm, requests, hparams, solver.matrices(hparams), batch)
    ctx.place(lm, placement)
    settings = replace(settings, chunk_size=placement.value_chunk)
    templates = ctx.templates(lm, hparams)

    def optimise(indices: list[int]) -> ValueResult:
        part = batch if len(indices) == len(requests) else build_batch(lm, [requests[i] for i in indices], templates, hparams, settings.kinds)
        return optimise_values(lm, part, layers[-1], hparams, site, settings, ctx.replay)

    values, cached = values_through_cache(ctx.value_cache, lm, requests, layers[-1], site, templates, hparams, settings, optimise,
                                          solver.constants())
    site_module = lm.arch.site(layers[-1], site)
    edit = _Edit(lm, requests, hparams, ctx, solver, mu, site_module, bare_key_residual, nullspace_threshold, residual_from,
                 values.target, placement.key_chunk)
    names = [lm.arch.weight_name(layer) for layer in layers]
    originals = snapshot(lm.model, names)
    deltas: Deltas = {}
    layer_records, solved_keys = [], []
    for i, layer in enumerate(layers):
        deltas[names[i]], record, keys = _solve_layer(edit, i, layer)
        layer_records.append(record)
        solved_keys.append(keys)
    if solver.remember_keys:
        for layer, keys in zip(layers, solved_keys):
            ctx.remember_keys(lm, layer, keys)
    request_records = [
        {"case_id": r.case_id, "v_steps": values.steps[j], "v_loss": values.final_loss[j],
         "v_target_prob": values.target_prob[j], "delta_ratio": values.delta_ratio[j], **({"v_cached": True} if cached[j] else {})}
        for j, r in enumerate(requests)
    ]
    return EditResult(deltas, originals, request_records, layer_records, values.delta,
                      {"keys": placement.key_chunk, "values": placement.value_chunk}, "host" if placement.host else "device")


def _solve_layer(edit: _Edit, i: int, layer: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One layer's step: its keys from the current model, the residual left spread over the layers
    left, one solve, the update applied. Returns (the delta stored, on the host; the layer's record;
    the keys solved with, m x n)."""
    lm, hparams, ctx, layers = edit.lm, edit.hparams, edit.ctx, edit.hparams.layers
    constraint = edit.solver.constraint
    keys = edit_keys(lm, edit.requests, [layer], hparams, ctx, site=edit.site_module, chunk_size=edit.key_chunk)
    weight = edited_weight(lm.model, lm.arch, layer)
    device = weight.device  # solve where the matrix lives (a GPU under a device map), in float64
    k_star = keys.k_star[layer].to(device, torch.float64).T  # m x n
    current = keys.site_output if edit.residual_from == "bare_prompt" else keys.site_mean
    residual = (edit.targets.to(device, torch.float64) - current.to(device, torch.float64)).T / (len(layers) - i)  # d x n
    k_constraint = keys.k_bare[layer].to(device, torch.float64).T if edit.bare_key_residual else k_star
    # what the record needs of W, read now: no float64 copy of W lives through the solve
    weight_norm, weight_keys = _weight_figures(weight, k_constraint)
    cov = None if constraint == "nullspace" else ctx.covariance(lm, layer, hparams)  # AlphaEdit needs only U
    # kept matrices in host memory are moved in by the solve and freed with its locals
    delta, info = solve_update(
        residual, k_constraint, cov, constraint, mu=edit.mu,
        K_dir=k_star if edit.bare_key_residual else None, layer=lm.arch.down_proj(layer),
        prior=ctx.edited_keys(lm, layer) if edit.solver.remember_keys else None,
        basis=ctx.nullspace(lm, layer, hparams, edit.nullspace_threshold) if constraint == "nullspace" else None,
    )
    record = {**_layer_record(layer, delta, weight_norm, weight_keys, k_constraint, residual, info.seconds), **info.extras}
    name = lm.arch.weight_name(layer)
    stored = to_stored(lm.arch, delta).to(lm.model.get_parameter(name).dtype)
    apply_deltas(lm.model, {name: stored})  # on the weight's device: no round trip through the host
    return stored.cpu(), record, k_constraint


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


def _weight_figures(weight: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||W||_F and W K in float64, the figures of W that `_layer_record` needs (W's float64 copy dies here)."""
    weight = weight.double()
    return weight.norm(), weight @ keys


def _layer_record(layer: int, delta: torch.Tensor, weight_norm: torch.Tensor, weight_keys: torch.Tensor, keys: torch.Tensor,
                  residual: torch.Tensor, seconds: float) -> dict:
    """||Delta||_F, ||Delta|| / ||W||, and the least-squares residual ||(W+Delta)K - V|| / ||V||
    with V = W K + R, the values this layer was asked to produce: (W+Delta)K - V = Delta K - R."""
    wanted = weight_keys + residual
    return {
        "layer": layer,
        "delta_norm": delta.norm().item(),
        "delta_rel": (delta.norm() / weight_norm).item(),
        "lsq_residual": (delta @ keys - residual).norm().item() / wanted.norm().item(),
        "solve_seconds": seconds,
    }
