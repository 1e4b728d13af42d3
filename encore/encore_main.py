"""ENCORE (Gupta et al. 2025, "Lifelong sequential knowledge editing without model degradation"):
MEMIT whose preservation matrix also holds a Frobenius-norm term and the keys K_p of the run's
earlier edits (EditContext.state). Per layer

    Delta = R K^T (lambda C0 + mu I + K_p K_p^T + K K^T)^-1   (lambda = mom2_update_weight,
                                                               mu = update_norm_lambda)

plus most-probable early stopping of the value optimisation (`v_argmax_stop_steps`, see
rome/compute_v.py): a request stops once every target token has been the argmax after every
templated prompt at that many steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from rome.declaration import Editor
from rome.editor import EditContext, EditResult, Solver, edit_layers
from rome.hparams import EditHyperParams
from util.hparams import NON_NEGATIVE, out_of_range
from util.models import LoadedModel
from util.requests import EditRequest

SOLVER = Solver("least_squares", remember_keys=True, mu="update_norm_lambda")  # MEMIT's, + mu I and the run's earlier keys


@dataclass(frozen=True)
class ENCOREHyperParams(EditHyperParams):
    update_norm_lambda: float = 10.0  # mu, the Frobenius-norm term mu I

    def validate(self) -> str | None:
        return out_of_range(self, {"update_norm_lambda": NON_NEGATIVE}) or super().validate()


def apply_encore(lm: LoadedModel, requests: list[EditRequest], hparams: ENCOREHyperParams, ctx: EditContext) -> EditResult:
    return edit_layers(lm, requests, hparams, ctx, SOLVER)


EDITOR = Editor("ENCORE", ENCOREHyperParams, apply_encore, solver=SOLVER)
