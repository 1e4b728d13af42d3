"""An editor declares itself with one object, which the registry (editors.py) lists:

    EDITOR = Editor("EMMET", EMMETHyperParams, apply_emmet, solver=SOLVER)

name, hparams class and apply; for the closed-form editors the `Solver` their apply hands
rome.editor.edit_layers (constraint, site, which hparams give mu and the null-space cut), which
memory plans read without editing; the hparams the editor sets itself (`fixed`: ROME and r-ROME
differ only in original_implementation); what must be computed from the unedited model before the
first edit (`prepare`); and which parameters it changes for a given model and hparams (`edits`).
The run pipeline asks `edited_params` and restores, checkpoints, measures (||W - W0||) and exports
exactly those, so an editor that changes more than the down projections is covered like the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rome.editor import EditContext, EditResult, Solver
from util.models import LoadedModel
from util.requests import EditRequest


def down_projections(lm: LoadedModel, hparams: Any) -> list[str]:
    """The down-projection weight of every layer in hparams.layers (the closed-form editors' W)."""
    return [lm.arch.weight_name(layer) for layer in hparams.layers]


def templates_and_statistics(lm: LoadedModel, hparams: Any, ctx: EditContext) -> None:
    """Context templates and, with mom2 adjustment, C0 of every edited layer (host memory; device
    copies follow at the first solve), from the model as it is now."""
    ctx.templates(lm, hparams)
    if hparams.mom2_adjustment:
        ctx.moments(lm, hparams)


@dataclass(frozen=True)
class Editor:
    name: str
    hparams_class: type
    apply: Callable[[LoadedModel, list[EditRequest], Any, EditContext], EditResult]
    solver: Solver | None = None  # closed-form editors: what apply hands rome.editor.edit_layers
    # the parameter names an edit may change, for a model and hparams (resolved via util/arch.py)
    edits: Callable[[LoadedModel, Any], list[str]] = down_projections
    fixed: Mapping[str, Any] = field(default_factory=dict)  # hparams the editor sets; a file may only repeat them
    # what must come from the unedited model, computed before the first edit (a continued run
    # restores edited weights afterwards); None: nothing
    prepare: Callable[[LoadedModel, Any, EditContext], None] | None = templates_and_statistics

    def edited_params(self, lm: LoadedModel, hparams: Any) -> list[str]:
        return list(self.edits(lm, hparams))

    def takes(self, hparams: Any) -> bool:
        """Whether `hparams` are this editor's: its class, and the values it fixes."""
        return type(hparams) is self.hparams_class and all(getattr(hparams, k) == v for k, v in self.fixed.items())
