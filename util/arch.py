"""Architectures are data: where the edited weight, layers, final norm and unembedding live.

Resolved from `model.config.model_type`, never from the model's name. The edited module is the
MLP down projection (v = W k): its input is the key k, its output is added to the residual stream.
GPT-2 stores that weight transposed (Conv1D, shape in x out); `transposed` says so explicitly
instead of guessing from shapes, which fails for square matrices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from util.errors import ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # ModuleList of decoder blocks
    mlp_down: str  # the edited projection, "{}" = layer index
    transposed: bool  # weight stored as (in, out) rather than torch.nn.Linear's (out, in)
    final_norm: str
    unembed: str
    embed: str

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def down_proj(self, index: int) -> str:
        return self.mlp_down.format(index)

    def weight_name(self, index: int) -> str:
        return self.down_proj(index) + ".weight"


_GPT2 = ArchSpec("transformer.h", "transformer.h.{}.mlp.c_proj", True, "transformer.ln_f", "lm_head", "transformer.wte")
_GPTJ = ArchSpec("transformer.h", "transformer.h.{}.mlp.fc_out", False, "transformer.ln_f", "lm_head", "transformer.wte")
_LLAMA = ArchSpec("model.layers", "model.layers.{}.mlp.down_proj", False, "model.norm", "lm_head", "model.embed_tokens")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def arch_for(model: torch.nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"model_type '{model_type}' is not in the architecture table (util/arch.py); "
            f"known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name)


def edited_weight(model: torch.nn.Module, arch: ArchSpec, layer: int) -> torch.Tensor:
    """W of the math (d_hidden x d_intermediate) as a view of the stored parameter."""
    weight = get_parameter(model, arch.weight_name(layer))
    return weight.T if arch.transposed else weight


def to_stored(arch: ArchSpec, delta: torch.Tensor) -> torch.Tensor:
    """Orient a d x m delta like the stored parameter."""
    return delta.T if arch.transposed else delta
