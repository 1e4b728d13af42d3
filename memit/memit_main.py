"""MEMIT: values at the last edited layer, residual spread over the layers, and per layer

    Delta = R K^T (lambda C0 + K K^T)^-1   (lambda = mom2_update_weight)

the minimiser of lambda tr(Delta C0 Delta^T) + ||(W + Delta) K - (W K + R)||^2.

PRUNE and RECT are MEMIT whose finished per-matrix updates are then transformed
(`apply_memit_transformed`): the solve is MEMIT's, only what is written into W differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rome.declaration import Editor
from rome.editor import EditContext, EditResult, Solver, edit_layers
from rome.hparams import EditHyperParams
from util.deltas import apply_deltas, restore
from util.models import LoadedModel
from util.requests import EditRequest

SOLVER = Solver("least_squares")  # also PRUNE's and RECT's, which transform its deltas


@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    pass


def apply_memit(lm: LoadedModel, requests: list[EditRequest], hparams: MEMITHyperParams, ctx: EditContext) -> EditResult:
    return edit_layers(lm, requests, hparams, ctx, SOLVER)


EDITOR = Editor("MEMIT", MEMITHyperParams, apply_memit, solver=SOLVER)


# (parameter name, MEMIT's delta, the parameter before this edit) -> (delta to write, record fields)
Transform = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def apply_memit_transformed(lm: LoadedModel, requests: list[EditRequest], hparams: EditHyperParams,
                            ctx: EditContext, transform: Transform) -> EditResult:
    """MEMIT's edit, then each matrix's delta replaced by transform(name, delta, W before the edit).

    As in the AlphaEdit release's MEMIT_rect, every layer is solved with the full updates of the
    layers before it in place; the transformed deltas replace them afterwards. The originals are
    restored first, so an entry the transform leaves at zero equals W before the edit bitwise."""
    result = edit_layers(lm, requests, hparams, ctx, SOLVER)
    restore(lm.model, result.originals)
    deltas = {}
    for name, record in zip(result.deltas, result.layers):
        solved = result.deltas[name]
        delta, fields = transform(name, solved, result.originals[name])
        deltas[name] = delta.to(solved.dtype)
        # delta_norm/delta_rel now describe what was written; lsq_residual stays MEMIT's solve's
        scale = deltas[name].double().norm().item() / max(solved.double().norm().item(), 1e-300)
        record.update(fields, memit_delta_norm=record["delta_norm"], delta_norm=record["delta_norm"] * scale,
                      delta_rel=record["delta_rel"] * scale)
    apply_deltas(lm.model, deltas)
    result.deltas = {name: delta.cpu() for name, delta in deltas.items()}  # the result's deltas live on the host
    return result
