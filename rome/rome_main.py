"""ROME and r-ROME: one fact at a time, a rank-one update of one layer's down projection.

    W' = W + (v* - W k)(C^-1 k*)^T / ((C^-1 k*)^T k),   v* = W k_bare + delta

(v*: the down projection's output at the bare prompt plus the optimised delta). r-ROME uses
k = k* (template-averaged), so W' k* = v* exactly (`rrome_target: templated` instead asks
W' k* = W k* + delta); the original ROME uses the bare prompt's key k in the residual and the
denominator, the asymmetry behind its "disabling edits". Several requests are edited one after
another, each on the already-edited model, as in the paper.
"""
from __future__ import annotations

import torch

from rome.declaration import Editor
from rome.editor import EditContext, EditResult, Solver, edit_layers
from rome.hparams import ROMEHyperParams
from util.deltas import merge
from util.models import LoadedModel
from util.requests import EditRequest


def rrome_residual(hparams: ROMEHyperParams) -> str:
    """rebuilding-rome: target minus the template-averaged output, solved at k* (rrome_target: bare)."""
    return "key_average" if hparams.rrome_target == "bare" else "bare_prompt"


# C^-1-weighted rank-one update, Delta k = r, at the down projection's output
SOLVER = Solver("equality", site="mlp", bare_key_residual=True)  # the original ROME: bare-prompt keys
R_SOLVER = Solver("equality", site="mlp", residual_from=rrome_residual)


def apply_rome(lm: LoadedModel, requests: list[EditRequest], hparams: ROMEHyperParams, ctx: EditContext) -> EditResult:
    """One request after another; ROME's or r-ROME's solver as hparams.original_implementation says
    (each editor below fixes it)."""
    solver = SOLVER if hparams.original_implementation else R_SOLVER
    total = None
    for request in requests:
        result = edit_layers(lm, [request], hparams, ctx, solver)
        if total is None:
            total = result
        else:
            total = EditResult(merge(total.deltas, result.deltas), total.originals, total.requests + result.requests,
                               total.layers + result.layers, torch.cat([total.value_deltas, result.value_deltas]))
    return total


ROME = Editor("ROME", ROMEHyperParams, apply_rome, solver=SOLVER, fixed={"original_implementation": True})
R_ROME = Editor("R-ROME", ROMEHyperParams, apply_rome, solver=R_SOLVER, fixed={"original_implementation": False})
