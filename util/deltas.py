"""Weight deltas as explicit objects: {parameter name: tensor in the parameter's orientation}.

Editors return them; the driver applies, undoes, measures and checkpoints them.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

Deltas = dict[str, torch.Tensor]


@torch.no_grad()
def apply_deltas(model: torch.nn.Module, deltas: Deltas) -> None:
    for name, delta in deltas.items():
        param = model.get_parameter(name)
        param.add_(delta.to(param.device, param.dtype))


def snapshot(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    return {name: model.get_parameter(name).detach().clone() for name in names}


@torch.no_grad()
def restore(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put saved weights back, bitwise: the one way weights are restored (an edit undone, a
    batched run's W0, a rollback, a checkpoint)."""
    for name, value in originals.items():
        model.get_parameter(name).copy_(value)


def digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named weights' bytes in name order given: identifies W0, so that a continued run
    or an export can check it loaded the same model."""
    sha = hashlib.sha256()
    for name, value in weights.items():
        sha.update(name.encode())
        sha.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@contextlib.contextmanager
def applied(model: torch.nn.Module, deltas: Deltas) -> Iterator[None]:
    """Apply deltas for the duration of the block; the original weights come back bitwise."""
    originals = snapshot(model, deltas)
    apply_deltas(model, deltas)
    try:
        yield
    finally:
        restore(model, originals)


def merge(total: Deltas, new: Deltas) -> Deltas:
    """Sum of two delta sets (cumulative change of a run)."""
    out = dict(total)
    for name, delta in new.items():
        out[name] = out[name] + delta if name in out else delta.clone()
    return out


def delta_records(deltas: Deltas, originals: dict[str, torch.Tensor]) -> list[dict]:
    """Per parameter: ||Delta||_F, ||Delta|| / ||W|| and max |Delta_ij| (float64), for an edit's record."""
    records = []
    for name, delta in deltas.items():
        delta, weight = delta.double(), originals[name].double().to(delta.device)
        records.append({"param": name, "delta_norm": delta.norm().item(), "delta_rel": (delta.norm() / weight.norm()).item(),
                        "delta_max": delta.abs().max().item()})
    return records
