"""RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue"): MEMIT, after which only the top k% entries of each edited
matrix's update, ranked by the relative change |Delta_ij| / |W_ij|, are written; every other
entry keeps its value from before the edit.

Choices (repeated in hparams/RECT/*.yaml): exactly round(k% of the entries) are kept (ties broken by
torch.topk; the AlphaEdit release keeps every entry at or above a k-th value threshold, which can
keep more); W is the matrix before this edit (in a sequential run, the already edited one, as in
the release); |W_ij| + 1e-8 guards zero entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memit.memit_main import SOLVER, MEMITHyperParams, apply_memit_transformed
from rome.declaration import Editor
from rome.editor import EditContext, EditResult
from util.models import LoadedModel
from util.requests import EditRequest

EPSILON = 1e-8


@dataclass(frozen=True)
class RECTHyperParams(MEMITHyperParams):
    rect_top_percent: float = 40.0  # k: the percentage of each matrix's entries the update may change

    def validate(self) -> str | None:
        if not 0 < self.rect_top_percent <= 100:
            return f"key 'rect_top_percent' must be in (0, 100], got {self.rect_top_percent}"
        return super().validate()


def top_relative_mask(delta: torch.Tensor, weight: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of the round(percent% of numel) entries with the largest |delta| / (|weight| + eps)."""
    relative = (delta.double().abs() / (weight.double().abs() + EPSILON)).flatten()
    kept = torch.topk(relative, round(relative.numel() * percent / 100)).indices
    mask = torch.zeros(relative.numel(), dtype=torch.bool, device=relative.device)
    mask[kept] = True
    return mask.view(delta.shape)


def apply_rect(lm: LoadedModel, requests: list[EditRequest], hparams: RECTHyperParams, ctx: EditContext) -> EditResult:
    def transform(name: str, delta: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, dict]:
        delta = delta.to(before.device)  # ranked where the weight lives
        mask = top_relative_mask(delta, before, hparams.rect_top_percent)
        return delta * mask, {"rect_kept": int(mask.sum())}

    return apply_memit_transformed(lm, requests, hparams, ctx, transform)


EDITOR = Editor("RECT", RECTHyperParams, apply_rect, solver=SOLVER)  # MEMIT's solve
