"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's values and residual spreading, with the update
projected onto the approximate null space of the preserved keys. Per layer

    Delta = R K^T P (K_p K_p^T P + K K^T P + alpha I)^-1   (alpha = L2)

where P = U U^T, U the eigenvectors of C0 = E[k k^T] with eigenvalue < nullspace_threshold, and
K_p the keys of the run's earlier edits (EditContext.state). Delta = Delta P, so the preserved
keys' outputs barely move: E||Delta k||^2 = tr(Delta C0 Delta^T) <= threshold ||Delta||_F^2.
"""
from __future__ import annotations

from dataclasses import dataclass

from rome.declaration import Editor
from rome.editor import EditContext, EditResult, Solver, edit_layers
from rome.hparams import EditHyperParams
from util.hparams import POSITIVE, out_of_range
from util.models import LoadedModel
from util.requests import EditRequest

# projected onto C0's null space, with the run's earlier keys; alpha = L2
SOLVER = Solver("nullspace", remember_keys=True, mu="L2", threshold="nullspace_threshold")


@dataclass(frozen=True)
class AlphaEditHyperParams(EditHyperParams):
    nullspace_threshold: float = 2e-2  # eigenvalue cut on C0 itself (mom2_update_weight plays no part)
    L2: float = 10.0  # alpha, the ridge term of the null-space system

    def validate(self) -> str | None:
        if not self.mom2_adjustment:
            return "AlphaEdit projects onto the null space of C0: key 'mom2_adjustment' must be true"
        return out_of_range(self, {"nullspace_threshold": POSITIVE, "L2": POSITIVE}) or super().validate()


def apply_alphaedit(lm: LoadedModel, requests: list[EditRequest], hparams: AlphaEditHyperParams, ctx: EditContext) -> EditResult:
    return edit_layers(lm, requests, hparams, ctx, SOLVER)


EDITOR = Editor("AlphaEdit", AlphaEditHyperParams, apply_alphaedit, solver=SOLVER)
