"""Architectures are data: where the edited weight, layers, final norm and unembedding live, and
what the value loss must do like the model.

Resolved from `model.config.model_type`, never from the model's name. The edited module of the
solve-based editors is the MLP down projection (v = W k): its input is the key k. Other editors
name other sites of a layer (`SITES`: the whole MLP, its input projection, its gate);
`module(site, layer)` resolves them here, so that which parameters an editor changes is read from
this table. GPT-2 stores its projections transposed (Conv1D, shape in x out); `transposed` says so
explicitly instead of guessing from shapes, which fails for square matrices. What differs between
the families, and where it matters:

- Where the down projection's output goes. In most families it is added to the residual stream
  as it is (GPT-J and GPT-NeoX run attention and MLP in parallel, from the same input: still
  added as it is), so a value's delta can be added at the layer's output. Gemma 2/3 and OLMo 2
  normalise it first (`mlp_post_norm`): the layer's output is not linear in W, so there every
  value lives at the down projection's output (`site`) and the delta is added there.
- The logits: Gemma 2/3 soft-cap them (`logit_softcap`, cap * tanh(logits / cap), the cap a
  config value, applied where the config sets it: `final_logits`).
- The value replay (rome/values/replay.py): the functional Llama layer serves the layers that compute
  exactly transformers' LlamaDecoderLayer (`llama_layers`: Llama, Mistral, Qwen2), transformers'
  own modules the others; a post-norm family replays the full model.
- Module names: GPT-NeoX's (gpt_neox.layers.{}.mlp.dense_4h_to_h); Phi-3's fused gate_up
  projection feeds a plain down_proj, so its keys (the down projection's input) read as Llama's.
Gemma scales its input embeddings by sqrt(d) inside its own forward; nothing here recomputes
embeddings, so that needs no entry. Tied unembeddings are still the `lm_head` module.
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
    # "{}" = layer index: a norm applied to the down projection's output before the residual sum
    mlp_post_norm: str | None = None
    logit_softcap: str | None = None  # the config attribute of the final logits' soft-cap, where the family has one
    mlp_up: str | None = None  # the MLP's input projection (up_proj, c_fc, fc_in; Phi-3's fused gate_up_proj), "{}" = layer index
    mlp_gate: str | None = None  # its gate projection, where the MLP has a separate one (Llama's gate_proj)
    llama_layers: bool = False  # decoder layers compute exactly LlamaDecoderLayer (rome.values.llama_layer)

    def __post_init__(self) -> None:
        if self.llama_layers and self.mlp_post_norm:  # LlamaDecoderLayer has no post-norm (the replay relies on it)
            raise ValueError("an architecture with mlp_post_norm does not compute LlamaDecoderLayer (llama_layers)")

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def down_proj(self, index: int) -> str:
        return self.mlp_down.format(index)

    def weight_name(self, index: int) -> str:
        return self.down_proj(index) + ".weight"

    def site(self, index: int, site: str) -> str:
        """The module whose output holds an edit's value at layer `index`: the down projection's
        ("mlp", ROME) or the layer's ("layer", MEMIT and its successors), where a value's delta is
        added (the same change of the residual stream wherever the down projection's output joins it
        unchanged); the down projection's for either on a post-norm family."""
        if site not in ("mlp", "layer"):
            raise ValueError(f"site must be 'mlp' or 'layer', got {site!r}")
        return self.down_proj(index) if site == "mlp" or self.mlp_post_norm else self.layer(index)

    def final_logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to its unembedding's output: soft-capping where its config sets a cap."""
        cap = getattr(config, self.logit_softcap, None) if self.logit_softcap else None
        return logits if cap is None else torch.tanh(logits / cap) * cap

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
_NEOX = ArchSpec("gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", False, "gpt_neox.final_layer_norm", "lm_head", "gpt_neox.embed_in",
                 mlp_up="gpt_neox.layers.{}.mlp.dense_h_to_4h")
_DECODER = dict(layers="model.layers", mlp_down="model.layers.{}.mlp.down_proj", transposed=False, final_norm="model.norm",
                unembed="lm_head", embed="model.embed_tokens", mlp_up="model.layers.{}.mlp.up_proj",
                mlp_gate="model.layers.{}.mlp.gate_proj")
_LLAMA = ArchSpec(**_DECODER, llama_layers=True)
_LLAMA_NAMES = ArchSpec(**_DECODER)  # Llama's module names, layers of their own (q/k norms, Gemma's norms)
_PHI3 = ArchSpec(**dict(_DECODER, mlp_up="model.layers.{}.mlp.gate_up_proj", mlp_gate=None))  # gate and up fused in one projection
_POST_NORM = dict(_DECODER, mlp_post_norm="model.layers.{}.post_feedforward_layernorm")
_GEMMA_POST_NORM = ArchSpec(**_POST_NORM, logit_softcap="final_logit_softcapping")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA_NAMES,
    "gemma": _LLAMA_NAMES,
    "phi3": _PHI3,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "olmo2": ArchSpec(**_POST_NORM),
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
    return site_weight(model, arch, "mlp_down", layer)


def site_parameters(model: torch.nn.Module, arch: ArchSpec, site: str, layers: list[int]) -> list[str]:
    """The names of every parameter of `site` at `layers` (weights and biases), in layer order."""
    names = []
    for layer in layers:
        module = arch.module(site, layer)
        names += [f"{module}.{name}" for name, _ in model.get_submodule(module).named_parameters()]
    return names


def site_weight(model: torch.nn.Module, arch: ArchSpec, site: str, layer: int) -> torch.Tensor:
    """The weight of a projection `site` at `layer` as out x in (the math's W, v = W k), a view of the stored parameter."""
    weight = get_parameter(model, arch.module(site, layer) + ".weight")
    return weight.T if arch.transposed else weight


def to_stored(arch: ArchSpec, delta: torch.Tensor) -> torch.Tensor:
    """Orient a d x m delta like the stored parameter."""
    return delta.T if arch.transposed else delta
