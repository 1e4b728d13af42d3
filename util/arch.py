"""Architectures are data: where the edited weight, layers, final norm and unembedding live.

Resolved from `model.config.model_type`, never from the model's name. The edited module of the
solve-based editors is the MLP down projection (v = W k): its input is the key k, its output is
added to the residual stream. Other editors name other sites of a layer (`SITES`: the whole MLP,
its input projection, its gate); `module(site, layer)` resolves them here, so that which
parameters an editor changes is read from this table. GPT-2 stores its projections transposed
(Conv1D, shape in x out); `transposed` says so explicitly instead of guessing from shapes, which
fails for square matrices.
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
    mlp_up: str | None = None  # the MLP's input projection (up_proj, c_fc, fc_in), "{}" = layer index
    mlp_gate: str | None = None  # its gate projection, where the MLP is gated (Llama's gate_proj)

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def down_proj(self, index: int) -> str:
        return self.mlp_down.format(index)

    def weight_name(self, index: int) -> str:
        return self.down_proj(index) + ".weight"

    def module(self, site: str, index: int) -> str:
        """The module path of `site` (one of SITES) at layer `index`; "mlp" is the block holding the
        down projection. A site this architecture lacks fails in one line."""
        if site == "mlp":
            return self.down_proj(index).rsplit(".", 1)[0]
        template = {"mlp_down": self.mlp_down, "mlp_up": self.mlp_up, "mlp_gate": self.mlp_gate}.get(site)
        if template is None:
            raise ModelLoadError(f"site '{site}' is not in the architecture table (util/arch.py) for a model with layers "
                                 f"at {self.layers}; sites: {', '.join(s for s in SITES if s == 'mlp' or getattr(self, s))}")
        return template.format(index)


SITES = ("mlp", "mlp_down", "mlp_up", "mlp_gate")  # what ArchSpec.module resolves


_GPT2 = ArchSpec("transformer.h", "transformer.h.{}.mlp.c_proj", True, "transformer.ln_f", "lm_head", "transformer.wte",
                 mlp_up="transformer.h.{}.mlp.c_fc")
_GPTJ = ArchSpec("transformer.h", "transformer.h.{}.mlp.fc_out", False, "transformer.ln_f", "lm_head", "transformer.wte",
                 mlp_up="transformer.h.{}.mlp.fc_in")
_LLAMA = ArchSpec("model.layers", "model.layers.{}.mlp.down_proj", False, "model.norm", "lm_head", "model.embed_tokens",
                  mlp_up="model.layers.{}.mlp.up_proj", mlp_gate="model.layers.{}.mlp.gate_proj")

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


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name)


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def edited_weight(model: torch.nn.Module, arch: ArchSpec, layer: int) -> torch.Tensor:
    """W of the math (d_hidden x d_intermediate) as a view of the stored parameter."""
    return site_weight(model, arch, "mlp_down", layer)


def site_parameters(model: torch.nn.Module, arch: ArchSpec, site: str, layers: list[int]) -> list[str]:
    """The names of every parameter of `site` at `layers` (weights and biases), in layer order."""
    names = []
    for layer in layers:
        module = arch.module(site, layer)
        names += [f"{module}.{name}" for name, _ in get_module(model, module).named_parameters()]
    return names


def site_weight(model: torch.nn.Module, arch: ArchSpec, site: str, layer: int) -> torch.Tensor:
    """The weight of a projection `site` at `layer` as out x in (the math's W, v = W k), a view of the stored parameter."""
    weight = get_parameter(model, arch.module(site, layer) + ".weight")
    return weight.T if arch.transposed else weight


def to_stored(arch: ArchSpec, delta: torch.Tensor) -> torch.Tensor:
    """Orient a d x m delta like the stored parameter."""
    return delta.T if arch.transposed else delta
