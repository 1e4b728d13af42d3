"""EMMET: the memorised values become equality constraints,

    minimise tr(Delta C Delta^T)  subject to  (W + Delta) K = V,   C = lambda C0,
    Delta = R (K^T C^-1 K + mu I)^-1 K^T C^-1   (mu = emmet_lambda, for conditioning at batch > 1)

with MEMIT's values and residual spreading. One edit at one layer is exactly r-ROME when both average
keys alike and take the residual at the bare prompt (key_average, rrome_target).
"""
from __future__ import annotations

from dataclasses import dataclass

from rome.declaration import Editor
from rome.editor import EditContext, EditResult, Solver, edit_layers
from rome.hparams import EditHyperParams
from util.hparams import NON_NEGATIVE, out_of_range
from util.models import LoadedModel
from util.requests import EditRequest

SOLVER = Solver("equality", mu="emmet_lambda", mu_from=2)  # Delta K = R exactly (+ mu I from batch 2 on), C-weighted


@dataclass(frozen=True)
class EMMETHyperParams(EditHyperParams):
    emmet_lambda: float = 0.1  # mu; used only when more than one request is edited at once

    def validate(self) -> str | None:
        return out_of_range(self, {"emmet_lambda": NON_NEGATIVE}) or super().validate()


def apply_emmet(lm: LoadedModel, requests: list[EditRequest], hparams: EMMETHyperParams, ctx: EditContext) -> EditResult:
    return edit_layers(lm, requests, hparams, ctx, SOLVER)


EDITOR = Editor("EMMET", EMMETHyperParams, apply_emmet, solver=SOLVER)
