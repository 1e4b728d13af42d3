"""Update health: how far the edited matrices have moved, and "disabling" edits.

Per batch of edits and per edited matrix: ||Delta|| (this batch's change), ||W - W0|| (the change
since the run started) and ||W||, all Frobenius norms in float64. Only the edited matrices' W0 are
kept. An edit is flagged disabling (it broke the model rather than changed one fact, as the
original ROME's asymmetric update does in sequential editing) when its ||Delta|| jumps far above
the run's typical update, or when the fluency of generated text collapses (HealthThresholds).
"""
from __future__ import annotations

import hashlib
import math
import statistics
from typing import Any, Sequence

import torch

from experiments.pipeline.run_config import HealthThresholds
from util.deltas import Deltas, snapshot


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
    """W0 copies of the edited matrices, the ||Delta|| history and the pre-edit fluency."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], thresholds: HealthThresholds):
        self.names = list(names)
        self.originals = snapshot(model, self.names)
        self.thresholds = thresholds
        self.delta_history: list[float] = []
        self.baseline_fluency: float | None = None

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, deltas: Deltas) -> dict[str, Any]:
        """Norms after applying `deltas`; 'delta_norm' is the batch's total over all matrices."""
        matrices = []
        for name in self.names:
            weight = model.get_parameter(name).detach().double()
            delta = deltas.get(name)
            matrices.append({
                "param": name,
                "delta_norm": float(delta.double().norm()) if delta is not None else 0.0,
                "drift_norm": float((weight - self.originals[name].double()).norm()),
                "weight_norm": float(weight.norm()),
                "weight0_norm": float(self.originals[name].double().norm()),
            })
        total = math.sqrt(sum(m["delta_norm"] ** 2 for m in matrices))
        drift = math.sqrt(sum(m["drift_norm"] ** 2 for m in matrices))
        return {"delta_norm": total, "drift_norm": drift, "matrices": matrices}

    def reasons(self, delta_norm: float, fluency: float | None) -> list[str]:
        return disabling_reasons(delta_norm, self.delta_history, fluency, self.baseline_fluency, self.thresholds)

    def record(self, delta_norm: float) -> None:
        self.delta_history.append(delta_norm)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Put the original matrices back (independent batches)."""
        for name, value in self.originals.items():
            model.get_parameter(name).copy_(value)

    def digest(self) -> str:
        """Identifies W0, so a continued run can check it loaded the same model."""
        sha = hashlib.sha256()
        for name in self.names:
            sha.update(name.encode())
            sha.update(self.originals[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"delta_history": list(self.delta_history), "baseline_fluency": self.baseline_fluency}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta_history = list(state["delta_history"])
        self.baseline_fluency = state["baseline_fluency"]
