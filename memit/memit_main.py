"""MEMIT: values at the last edited layer, residual spread over the layers, and per layer

    Delta = R K^T (lambda C0 + K K^T)^-1   (lambda = mom2_update_weight)

the minimiser of lambda tr(Delta C0 Delta^T) + ||(W + Delta) K - (W K + R)||^2.
"""
from __future__ import annotations

from dataclasses import dataclass

from rome.editor import EditContext, EditResult, edit_layers
from rome.hparams import EditHyperParams
from util.models import LoadedModel
from util.requests import EditRequest


@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    pass


def apply_memit(lm: LoadedModel, requests: list[EditRequest], hparams: MEMITHyperParams, ctx: EditContext) -> EditResult:
    return edit_layers(lm, requests, hparams, ctx, constraint="least_squares", site="layer")
