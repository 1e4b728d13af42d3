"""PRUNE (Ma et al. 2024, "Perturbation-Restrained Sequential Model Editing"): MEMIT, after which
the run's accumulated update of each edited matrix, Delta_acc = sum of MEMIT's deltas, is
written restrained:

    W = W0 + U F(S) V^T   with Delta_acc = U S V^T and
    F(s) = ln(s) - ln(s_max) + s_max  for s > s_max (the largest singular value of W0), else s

so the update's singular values beyond W0's largest grow only logarithmically; the others are
unchanged. Choices (repeated in hparams/PRUNE/*.yaml): the natural logarithm (as the AlphaEdit
release's MEMIT_prune); the restraint is applied after every edit to the raw accumulated update
(kept in EditContext.state), so every evaluation sees a restrained model (the release applies it
once after the last batch, and adds it to the already edited weight).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memit.memit_main import SOLVER, MEMITHyperParams, apply_memit_transformed
from rome.declaration import Editor
from rome.editor import EditContext, EditResult
from util.models import LoadedModel
from util.requests import EditRequest

PRUNE_STATE = "prune"  # EditContext.state[PRUNE_STATE] = {"raw": {param: Delta_acc}, "written": {param: U F(S) V^T}, "sigma_max": {param: s}}


@dataclass(frozen=True)
class PRUNEHyperParams(MEMITHyperParams):
    pass


def restrain(singular_values: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """PRUNE's F: ln(s) - ln(s_max) + s_max above s_max, the identity at or below it."""
    restrained = singular_values.log() - math.log(sigma_max) + sigma_max
    return torch.where(singular_values > sigma_max, restrained, singular_values)


def restrained_update(delta: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, int]:
    """U F(S) V^T of `delta` (float64) and how many singular values F changed."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U * restrain(S, sigma_max)) @ Vh, int((S > sigma_max).sum())


def apply_prune(lm: LoadedModel, requests: list[EditRequest], hparams: PRUNEHyperParams, ctx: EditContext) -> EditResult:
    store = ctx.state.setdefault(PRUNE_STATE, {"raw": {}, "written": {}, "sigma_max": {}})

    def transform(name: str, delta: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, dict]:
        device = before.device
        delta = delta.to(device, torch.float64)
        keep = torch.promote_types(before.dtype, torch.float32)  # a bfloat16 model's sums stay float32
        written = store["written"].get(name)
        if name not in store["sigma_max"]:  # the run's first edit: `before` is W0
            store["sigma_max"][name] = torch.linalg.matrix_norm(before.double(), ord=2).item()
        raw = delta if name not in store["raw"] else store["raw"][name].to(device, torch.float64) + delta
        update, n_restrained = restrained_update(raw, store["sigma_max"][name])
        store["raw"][name], store["written"][name] = raw.to("cpu", keep), update.to("cpu", keep)
        # W = W0 + update = before - written + update
        step = update if written is None else update - written.to(device, torch.float64)
        return step, {"prune_restrained": n_restrained, "prune_sigma_max": store["sigma_max"][name]}

    return apply_memit_transformed(lm, requests, hparams, ctx, transform)


EDITOR = Editor("PRUNE", PRUNEHyperParams, apply_prune, solver=SOLVER)  # MEMIT's solve
