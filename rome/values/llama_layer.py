"""The functions the fast replays run instead of transformers' attention and Llama layers.

`float32_sdpa`: attention in float32 inside mixed precision (registered into transformers by
rome.values.replay.ReplayRuntime, never at import, for the replayed modules while they replay). `llama_layer`: one
Llama decoder layer as a plain function of its weights, equal to transformers' layer under that
attention to the bit; torch.compile can fuse it (the module path goes through a cache object).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half


def float32_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """SDPA in float32 inside mixed precision: on CPUs its bfloat16 backward is ~10x slower than
    float32's, and attention is a small share of the FLOPs. With a mask (the replay always passes
    one) grouped-query heads go to SDPA as they are (`enable_gqa`): transformers would copy every
    key/value head for each query head (`repeat_kv`), which forward and backward cost ~11% of a
    batched step; the result is the same to the bit."""
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        groups = getattr(module, "num_key_value_groups", 1)
        special = any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache")) or kwargs.get("output_attentions")
        if attention_mask is None or groups == 1 or args or special:
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return grouped_sdpa(query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0)), None


def grouped_sdpa(query, key, value, mask, scale, dropout: float = 0.0, grouped: bool | None = None) -> torch.Tensor:
    """Float32 SDPA over (batch, heads, length, dim) with grouped key/value heads as they are;
    returns (batch, length, heads, dim). `grouped` (fewer key/value heads than query heads) is
    read from the shapes unless given: under torch.compile with dynamic shapes that comparison
    is symbolic, which SDPA does not take (a graph break in every layer)."""
    query, key, value = query.float(), key.float(), value.float()
    if mask.dtype != torch.bool:
        mask = mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=query.shape[1] != key.shape[1] if grouped is None else grouped)
    return out.transpose(1, 2).contiguous()


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm on a float32 residual stream."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps))


@dataclass
class LlamaWeights:
    """One Llama decoder layer's matrices (already in the mixed-precision dtype) and shapes."""
    input_norm: torch.Tensor
    input_eps: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    biases: tuple  # (q, k, v, o, gate, up, down) biases, None where the layer has none
    mlp_norm: torch.Tensor
    mlp_eps: float
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    grouped: bool  # kv_heads < heads, as a constant (see grouped_sdpa)

    @staticmethod
    def of(layer: torch.nn.Module) -> "LlamaWeights":
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return LlamaWeights(
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, tuple(m.bias for m in linears),
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
            attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim, attn.scaling,
            attn.config.num_key_value_heads < attn.config.num_attention_heads)


def is_plain_llama(layer: torch.nn.Module) -> bool:
    """A decoder layer of a family whose layers compute transformers' LlamaDecoderLayer (util/arch.py
    `llama_layers`, which the replay factory reads first: Llama, Mistral, Qwen2) configured as
    llama_layer computes it (silu, no pretraining_tp) under an attention that takes an explicit 4-d mask."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    return (getattr(config, "hidden_act", None) == "silu" and not getattr(config, "pretraining_tp", 1) > 1
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager"))


def llama_layer(hidden, prefix_keys, prefix_values, cos, sin, mask, w: LlamaWeights):
    """One replayed Llama decoder layer on the suffix, attending to the cached prefix: the same
    operations and dtypes as transformers' layer under autocast with float32_sdpa (matmuls in the
    weights' dtype, residual stream, norms, rotary embeddings and attention in float32)."""
    batch, length, _ = hidden.shape
    low = w.q.dtype
    linear = lambda x, weight, bias: torch.nn.functional.linear(x.to(low), weight, None if bias is None else bias.to(low))  # noqa: E731
    q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias = w.biases
    x = rms_norm(hidden, w.input_norm, w.input_eps)
    query = linear(x, w.q, q_bias).view(batch, length, w.heads, w.head_dim).transpose(1, 2)
    key = linear(x, w.k, k_bias).view(batch, length, w.kv_heads, w.head_dim).transpose(1, 2)
    value = linear(x, w.v, v_bias).view(batch, length, w.kv_heads, w.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    key, value = torch.cat((prefix_keys, key), dim=-2), torch.cat((prefix_values, value), dim=-2)
    attended = grouped_sdpa(query, key, value, mask[..., : key.shape[-2]], w.scaling, grouped=w.grouped).reshape(batch, length, w.heads * w.head_dim)
    hidden = hidden + linear(attended, w.o, o_bias)
    x = rms_norm(hidden, w.mlp_norm, w.mlp_eps)
    x = torch.nn.functional.silu(linear(x, w.gate, gate_bias)) * linear(x, w.up, up_bias)
    return hidden + linear(x, w.down, down_bias)
