"""Update health: how far the edited matrices have moved, and "disabling" edits.

Per batch of edits and per edited matrix: ||Delta|| (this batch's change), ||W - W0|| (the change
since the run started) and ||W||, all Frobenius norms in float64, read from the model, the deltas
and the original matrices W0 the caller keeps (the session, which also restores them). An edit is flagged disabling (it broke the model rather than changed one fact, as the
original ROME's asymmetric update does in sequential editing) when its ||Delta|| jumps far above
the run's typical update, or when the fluency of generated text collapses (HealthThresholds).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch

from experiments.pipeline.run_config import HealthThresholds
from util.deltas import Deltas


def disabling_reasons(
    delta_norm: float,
    history: Sequence[float],
    fluency: float | None,
    baseline_fluency: float | None,
    thresholds: HealthThresholds,
) -> list[str]:
    """Why an update counts as disabling (empty: it does not). history: ||Delta|| of the earlier
    batches; fluency: this batch's generation fluency (None when not measured)."""
    reasons = []
    if len(history) >= thresholds.min_history:
        median = statistics.median(history)
        if median > 0 and delta_norm > thresholds.norm_jump * median:
            reasons.append(f"norm jump: ||Delta|| {delta_norm:.4g} > {thresholds.norm_jump:g} x median {median:.4g}")
    if fluency is not None and baseline_fluency is not None and baseline_fluency > 0:
        if fluency < thresholds.entropy_ratio * baseline_fluency:
            reasons.append(
                f"entropy collapse: fluency {fluency:.4g} < {thresholds.entropy_ratio:g} x pre-edit {baseline_fluency:.4g}"
            )
    return reasons


class UpdateHealth:
    """The ||Delta|| history and the pre-edit fluency of a run: norms only, no weights."""

    def __init__(self, names: Sequence[str], thresholds: HealthThresholds):
        self.names = list(names)
        self.thresholds = thresholds
        self.delta_history: list[float] = []
        self.baseline_fluency: float | None = None
        self.baseline_perplexity: float | None = None

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, deltas: Deltas, weights0: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Norms after applying `deltas`, the run's drift from `weights0` (W0 of each edited matrix);
        'delta_norm' is the batch's total over all matrices."""
        matrices = []
        for name in self.names:
            weight = model.get_parameter(name).detach().double()
            original = weights0[name].double()
            delta = deltas.get(name)
            matrices.append({
                "param": name,
                "delta_norm": float(delta.double().norm()) if delta is not None else 0.0,
                "drift_norm": float((weight - original).norm()),
                "weight_norm": float(weight.norm()),
                "weight0_norm": float(original.norm()),
            })
        total = math.sqrt(sum(m["delta_norm"] ** 2 for m in matrices))
        drift = math.sqrt(sum(m["drift_norm"] ** 2 for m in matrices))
        return {"delta_norm": total, "drift_norm": drift, "matrices": matrices}

    def reasons(self, delta_norm: float, fluency: float | None) -> list[str]:
        return disabling_reasons(delta_norm, self.delta_history, fluency, self.baseline_fluency, self.thresholds)

    def record(self, delta_norm: float) -> None:
        self.delta_history.append(delta_norm)

    def perplexity_collapse(self, perplexity: float | None, ratio: float) -> str | None:
        """Why the model counts as collapsed at an evaluation (None: it does not, or ratio is 0):
        its perplexity reached `ratio` times the pre-edit perplexity."""
        if not ratio or perplexity is None or not self.baseline_perplexity:
            return None
        if perplexity >= ratio * self.baseline_perplexity:
            return f"perplexity {perplexity:.4g} >= {ratio:g} x pre-edit {self.baseline_perplexity:.4g}"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"delta_history": list(self.delta_history), "baseline_fluency": self.baseline_fluency,
                "baseline_perplexity": self.baseline_perplexity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta_history = list(state["delta_history"])
        self.baseline_fluency = state["baseline_fluency"]
        self.baseline_perplexity = state.get("baseline_perplexity")  # checkpoints from before the rule: read again at baseline
