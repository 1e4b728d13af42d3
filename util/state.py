"""Editors' run state (EditContext.state) on disk: a dict of str -> tensor or plain JSON values,
possibly nested in dicts. Tensors go to one safetensors file under "/"-joined key paths, the rest
to one JSON file; loading puts every tensor back where it was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SEPARATOR = "/"
TENSORS, PLAIN = "state.safetensors", "state.json"


def state_to_tensors(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(flat tensors {"a/b": tensor}, the remaining plain values nested as in `state`)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or SEPARATOR in key:
            raise ValueError(f"state key {key!r} must be a string without {SEPARATOR!r}")
        path = prefix + key
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            inner_tensors, inner_plain = state_to_tensors(value, path + SEPARATOR)
            tensors.update(inner_tensors)
            plain[key] = inner_plain
        else:
            json.dumps(value)  # plain values only: fails here, not halfway through a checkpoint
            plain[key] = value
    return tensors, plain


def state_from_tensors(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """Inverse of state_to_tensors."""
    state = json.loads(json.dumps(plain))  # a deep copy
    for path, tensor in tensors.items():
        *parents, leaf = path.split(SEPARATOR)
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = tensor
    return state


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, plain = state_to_tensors(state)
    save_file(tensors, str(folder / TENSORS))
    (folder / PLAIN).write_text(json.dumps(plain, indent=1))


def load_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    return state_from_tensors(load_file(str(folder / TENSORS)), json.loads((folder / PLAIN).read_text()))
