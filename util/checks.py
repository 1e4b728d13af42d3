"""Tensors read from files (run checkpoints, shared or cached key statistics) are checked before
anything uses or writes them: the file readable, each tensor present, of the expected shape and
finite. A failure is one line naming the file and the tensor's key, raised as the caller's error
class so that it says what the file is for."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from util.errors import KeditError


def read_tensors(path: Path, error: type[KeditError], remedy: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `path`; a missing, truncated or garbled file ends in
    `error` naming it, followed by `remedy` (what to do about it)."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise error(f"{path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}): {remedy}") from None


def checked_tensor(tensors: dict[str, torch.Tensor], key: str, shape: Sequence[int | None] | None, where: str | Path,
                   error: type[KeditError]) -> torch.Tensor:
    """tensors[key], present, of `shape` (None: any size in that dimension) and finite."""
    if key not in tensors:
        raise error(f"{where}: tensor '{key}' is missing")
    tensor = tensors[key]
    if shape is not None and (tensor.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, tensor.shape))):
        wanted = "x".join("?" if n is None else str(n) for n in shape)
        raise error(f"{where}: tensor '{key}' is {'x'.join(map(str, tensor.shape)) or 'a scalar'}, expected {wanted}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise error(f"{where}: tensor '{key}' holds NaN or infinite values")
    return tensor
