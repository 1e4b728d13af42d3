"""Editors' run state (EditContext.state) in a checkpoint's form: a dict of str -> tensor or plain
JSON values, possibly nested in dicts, split into flat tensors under "/"-joined key paths (the run
pipeline's checkpoint writes them to one safetensors file, experiments/pipeline/checkpoint.py) and
the plain values (its state.json); joining them puts every tensor back where it was.
"""
from __future__ import annotations

import json
from typing import Any

import torch

SEPARATOR = "/"


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

