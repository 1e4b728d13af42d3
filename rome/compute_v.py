"""Values: optimise, per request, a delta added to the residual stream at the fact token of the
edited layer, so that target_new becomes likely after every templated prompt.

Loss per request (the papers' form):
    mean over templated prompts of the target's mean token NLL
  + kl_factor * KL(new || original) of the next-token distribution of "{subject} is a" read at
    its fact token (the reference code's lookup index; `kl_position: prompt_end`: after "a")
  + v_weight_decay * ||delta|| / ||reference||^2,
with ||delta|| clamped to clamp_norm_factor * ||reference||. The reference vector is the output
being edited at the bare prompt's fact token: the down projection's output (ROME, site "mlp") or
the layer's output (MEMIT-style, site "layer"); the target value is reference + delta.

All requests are optimised together: one batched forward/backward per step, each request its own
delta and its own Adam state, a request leaving the batch once its loss is below the threshold
or, with `v_argmax_stop_steps` > 0 (ENCORE's most-probable early stopping), once every target
token has been the top prediction after every templated prompt at that many steps.

Fast path (default): the layers up to the edited one do not depend on the delta, so they run once
without grad; each step runs only the layers above it, and the unembedding is applied only at the
positions whose log-probabilities the loss reads; rows are grouped by length so that batching
requests adds no padding work. Under mixed precision, plain Llama layers are replayed by one
function (`_llama_layer`, equal to transformers' layers to the bit), which `compiled=True` hands to
torch.compile: it fuses the elementwise work around the matmuls. `fast=False` is the
straightforward path (full model forward with a hook, full logits), kept to check equality and
measure the speed-up.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rome.compute_u import templated_prompts
from rome.hparams import EditHyperParams
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half

from util.models import LoadedModel, input_device
from util.nethook import StopForward, Trace, add_to_output, hidden_of
from util.errors import RequestError
from util.requests import EditRequest
from util.tokens import encode_with_target, right_pad, subject_position


@dataclass
class ValueResult:
    delta: torch.Tensor  # (n, d) float32 (float64 for a float64 model), the optimised residual change
    reference: torch.Tensor  # (n, d) float64, the edited output at the bare prompt before editing
    steps: list[int]  # optimiser updates taken per request
    final_loss: list[float]
    target_prob: list[float]  # mean over templated prompts of exp(-mean token NLL)
    delta_ratio: list[float]  # ||delta|| / ||reference||

    @property
    def target(self) -> torch.Tensor:
        return self.reference + self.delta


@dataclass
class _Batch:
    """Rewrite sequences (templated prompt + target minus its last token) and KL sequences."""
    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor
    request_of_row: torch.Tensor  # (B,)
    fact_position: torch.Tensor  # (B,) where the delta is added
    is_rewrite: torch.Tensor  # (B,) bool; the others are KL rows
    bare_row: torch.Tensor  # (n,) the row of each request's bare rewrite prompt
    last_position: torch.Tensor  # (B,) last real token
    kl_read: torch.Tensor  # (B,) where a KL row's next-token distribution is read
    target_row: torch.Tensor  # (n_tokens,) per target token: its row,
    target_position: torch.Tensor  # the position predicting it,
    target_token: torch.Tensor  # its id,
    target_share: torch.Tensor  # and 1 / (target tokens of its prompt)
    n_prompts: int  # templated rewrite prompts per request


def build_batch(lm: LoadedModel, requests: list[EditRequest], templates: list[str], fact_token, kl_prompts: list[str],
                kl_position: str = "fact_token") -> _Batch:
    seqs, request_of_row, fact, rewrite, bare = [], [], [], [], []
    t_row, t_pos, t_tok, t_share = [], [], [], []
    for i, request in enumerate(requests):
        bare.append(len(seqs))
        for prompt in templated_prompts(request, templates):
            text = prompt.format(request.subject)
            full, start = encode_with_target(lm.tok, text, request.target_new)
            prefix, position = subject_position(lm.tok, prompt, request.subject, fact_token)
            if fact_token == "last":
                position = start - 1
            elif full[: position + 1] != prefix[: position + 1]:
                raise RequestError(f"{request.label()}: tokenisation of {text!r} changes when the target is appended")
            for j in range(start, len(full)):
                t_row.append(len(seqs))
                t_pos.append(j - 1)
                t_tok.append(full[j])
                t_share.append(1.0 / (len(full) - start))
            seqs.append(full[:-1])
            fact.append(position)
            rewrite.append(True)
            request_of_row.append(i)
        for kl_prompt in kl_prompts:
            ids, position = subject_position(lm.tok, kl_prompt, request.subject, fact_token)
            seqs.append(ids)
            fact.append(position)
            rewrite.append(False)
            request_of_row.append(i)
    ids, mask = right_pad(seqs, lm.tok.pad_token_id)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    last = mask.sum(1) - 1
    return _Batch(
        ids, mask, long(request_of_row), long(fact), torch.tensor(rewrite), long(bare), last,
        long(fact) if kl_position == "fact_token" else last,
        long(t_row), long(t_pos), long(t_tok), torch.tensor(t_share), len(templates),
    )


class _Active:
    """Index tensors for the requests still being optimised (rows renumbered locally)."""

    def __init__(self, batch: _Batch, active: list[int], n_requests: int):
        request_local = torch.full((n_requests,), -1, dtype=torch.long)
        request_local[active] = torch.arange(len(active))
        self.requests = torch.tensor(active, dtype=torch.long)
        self.rows = torch.nonzero(request_local[batch.request_of_row] >= 0)[:, 0]
        row_local = torch.full((len(batch.ids),), -1, dtype=torch.long)
        row_local[self.rows] = torch.arange(len(self.rows))
        self.row_request = request_local[batch.request_of_row[self.rows]]
        self.fact = batch.fact_position[self.rows]
        rewrite = batch.is_rewrite[self.rows]
        self.rewrite_rows = torch.nonzero(rewrite)[:, 0]
        self.kl_rows = torch.nonzero(~rewrite)[:, 0]
        self.kl_positions = batch.kl_read[self.rows][self.kl_rows]
        self.kl_original = self.rows[self.kl_rows]  # original row numbers: keys of the KL reference
        keep = row_local[batch.target_row] >= 0
        self.t_row = row_local[batch.target_row[keep]]
        self.t_position = batch.target_position[keep]
        self.t_token = batch.target_token[keep]
        self.t_share = batch.target_share[keep]


class _UpperStack:
    """The layers above the edited one, replayed on the positions the delta can reach.

    Rows are re-laid out so that every fact token sits in the same column P (left padding,
    explicit position ids). Causal attention means columns before P never see the delta: one
    unedited forward caches their keys/values at every layer, and each optimisation step runs
    only the layers above the edited one, only on columns P.. (the suffix), attending to that
    cached prefix. The layers' other arguments (masks, rotary embeddings) are captured from the
    unedited forward (and, for the modules, from one unedited suffix forward) and replayed."""

    def __init__(self, lm: LoadedModel, layer: int, loss_layer: int, batch: _Batch, rows: torch.Tensor,
                 autocast: torch.dtype | None = None, replay: "_Replay | None" = None):
        self.lm = lm
        self.autocast = autocast
        self.device_type = input_device(lm.model).type
        self.replay = replay or _Replay(lm, layer, loss_layer, autocast)
        self.modules = self.replay.layers
        ids, mask, fact = batch.ids[rows], batch.mask[rows], batch.fact_position[rows]
        lengths = mask.sum(1)
        self.prefix = int(fact.max())
        self.shift = self.prefix - fact  # per row: columns added on the left
        width = self.prefix + int((lengths - fact).max())
        aligned = torch.zeros((len(rows), width), dtype=torch.long)  # pads are masked out
        aligned_mask = torch.zeros_like(aligned)
        positions = torch.zeros_like(aligned)
        for r in range(len(rows)):
            start, n = int(self.shift[r]), int(lengths[r])
            aligned[r, start:start + n] = ids[r, :n]
            aligned_mask[r, start:start + n] = 1
            positions[r, start:start + n] = torch.arange(n)
        device = input_device(lm.model)
        aligned, aligned_mask, positions = aligned.to(device), aligned_mask.to(device), positions.to(device)
        self.cache = DynamicCache()
        full_calls = []  # the upper layers' arguments in this full-width forward
        handles = [m.register_forward_pre_hook(lambda m, args, kwargs: full_calls.append((args, kwargs)), with_kwargs=True)
                   for m in self.replay.original_layers]
        try:
            with torch.no_grad(), self.precision(), Trace(lm.model, lm.arch.layer(layer)) as base, Trace(lm.model, lm.arch.layer(loss_layer), stop=True):
                lm.model(input_ids=aligned, attention_mask=aligned_mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        self.prefix_kv = [(cached.keys[..., : self.prefix, :], cached.values[..., : self.prefix, :]) for cached in self.cache.layers]
        self.hidden = base.output[:, self.prefix:]  # (B, S, d): the edited layer's suffix output
        # _llama_layer needs each layer's explicit mask and rotary embeddings: their suffix rows are
        # sliced from the full forward's. The modules (else) need their own cache-aware arguments,
        # captured from one unedited suffix forward.
        self.functional = self.replay.llama is not None and all(
            isinstance(kw.get("attention_mask"), torch.Tensor) and kw.get("position_embeddings") is not None and not args[1:]
            for args, kw in full_calls)
        if self.functional:
            # Own tensors, not views, like those of narrowed stacks: torch.compile guards on the difference.
            own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
            # the replayed layers' cached prefixes
            self.upper_kv = [(own(keys), own(values)) for keys, values in self.prefix_kv[layer + 1:loss_layer + 1]]
            self.calls = [((), {"attention_mask": own(kw["attention_mask"][:, :, self.prefix:]),
                                "position_embeddings": tuple(own(t[:, self.prefix:]) for t in kw["position_embeddings"])})
                          for _, kw in full_calls]
            self.prefix_kv = self.cache = None  # the modules' cache of every layer: not needed here
            return
        self.calls: list[tuple[tuple, dict]] = []
        if self.modules:
            handles = [m.register_forward_pre_hook(self._capture, with_kwargs=True) for m in self.replay.original_layers]
            self._reset_cache()
            try:
                with torch.no_grad(), self.precision():
                    lm.model(input_ids=aligned[:, self.prefix:], attention_mask=aligned_mask,
                             position_ids=positions[:, self.prefix:], past_key_values=self.cache, use_cache=True)
            except StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()

    def narrowed(self, local: torch.Tensor) -> "_UpperStack":
        """This stack on a subset of its rows (`local`), without a forward: the replay function's
        arguments are all per row (only when `functional`)."""
        assert self.functional
        narrow = copy.copy(self)
        local = local.to(self.hidden.device)
        narrow.hidden, narrow.shift = self.hidden[local], self.shift[local.cpu()]
        narrow.upper_kv = [(keys[local], values[local]) for keys, values in self.upper_kv]
        rows = lambda t: t[local] if len(t) == len(self.hidden) else t  # noqa: E731 (a batch dim of 1 broadcasts)
        narrow.calls = [((), {"attention_mask": rows(kw["attention_mask"]),
                              "position_embeddings": tuple(map(rows, kw["position_embeddings"]))})
                        for _, kw in self.calls]
        return narrow

    def _capture(self, module, args, kwargs):
        self.calls.append((args, kwargs))
        if len(self.calls) == len(self.modules):
            raise StopForward("captured the arguments of every upper layer")

    def precision(self):
        """Mixed precision (e.g. bfloat16 matmuls) when asked for; a no-op otherwise."""
        return torch.autocast(self.device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def _reset_cache(self) -> None:
        for cached, (keys, values) in zip(self.cache.layers, self.prefix_kv):
            cached.keys, cached.values = keys, values

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Suffix column of original (right-padded) `positions` in local `rows`."""
        return positions + self.shift[rows] - self.prefix

    def __call__(self, added: torch.Tensor) -> torch.Tensor:
        """Suffix hidden states at the loss layer with `added` summed into the edited layer's output."""
        hidden = self.hidden + added
        if self.functional:
            with torch.autocast(self.device_type, enabled=False):  # the function casts explicitly
                for weights, (_, kwargs), (keys, values) in zip(self.replay.llama, self.calls, self.upper_kv):
                    cos, sin = kwargs["position_embeddings"]
                    hidden = self.replay.layer_function(hidden, keys, values, cos, sin, kwargs["attention_mask"], weights)
            return hidden
        self._reset_cache()
        for module, (args, kwargs) in zip(self.modules, self.calls):
            if args:
                out = module(hidden, *args[1:], **kwargs)
            else:
                out = module(**{**kwargs, "hidden_states": hidden})
            hidden = hidden_of(out)
        return hidden


# A row group costs about as much fixed per-call work (a forward and backward call per layer) as
# this many padded suffix tokens; it sets how finely rows are grouped by suffix length.
GROUP_OVERHEAD_TOKENS = 24


def length_groups(lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest member, plus `overhead` per group
    (default GROUP_OVERHEAD_TOKENS), costs the least (exact: dynamic programme over the sorted
    distinct lengths)."""
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    distinct = sorted(set(lengths))
    count = [sum(n == d for n in lengths) for d in distinct]
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for end in range(1, len(distinct) + 1):
        rows = 0
        for start in range(end, 0, -1):  # group = distinct[start-1 : end], padded to distinct[end-1]
            rows += count[start - 1]
            cost = best[start - 1] + rows * distinct[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start - 1
    bounds, end = [], len(distinct)
    while end:
        bounds.append((distinct[cut[end]], distinct[end - 1]))
        end = cut[end]
    return [[i for i, n in enumerate(lengths) if low <= n <= high] for low, high in reversed(bounds)]


class _GroupedStack:
    """The replay stack over rows grouped by suffix length, one _UpperStack per group.

    Rows of many requests differ in suffix length (prompt tail plus target); one stack pads all of
    them to the longest, which for a batch of 64 requests nearly doubles the tokens replayed per
    step. Grouping makes batching requests cheaper per request than optimising them one by one."""

    def __init__(self, lm: LoadedModel, layer: int, loss_layer: int, batch: _Batch, rows: torch.Tensor,
                 autocast: torch.dtype | None = None, replay: "_Replay | None" = None, compiled: bool = False):
        self.replay = replay or _Replay(lm, layer, loss_layer, autocast, compiled)
        suffix = batch.mask[rows].sum(1) - batch.fact_position[rows]
        groups = [torch.tensor(g) for g in length_groups(suffix.tolist())]
        self._assemble(rows, groups, [_UpperStack(lm, layer, loss_layer, batch, rows[g], autocast, self.replay) for g in groups])

    def _assemble(self, rows: torch.Tensor, groups: list[torch.Tensor], stacks: list[_UpperStack]) -> None:
        self.rows, self.groups, self.stacks = rows, groups, stacks
        self.group_of, self.local = torch.empty(len(rows), dtype=torch.long), torch.empty(len(rows), dtype=torch.long)
        for k, g in enumerate(self.groups):
            self.group_of[g], self.local[g] = k, torch.arange(len(g))
        self.device = self.stacks[0].hidden.device
        self.precision = self.stacks[0].precision

    @property
    def narrowable(self) -> bool:
        return all(stack.functional for stack in self.stacks)

    def narrowed(self, rows: torch.Tensor) -> "_GroupedStack":
        """The stack on `rows` (ascending batch rows, a subset of its own), sliced from this one
        without a forward (when `narrowable`): finished requests leave at no cost."""
        new_index = torch.full((len(self.rows),), -1, dtype=torch.long)
        kept = torch.isin(self.rows, rows)
        new_index[kept] = torch.searchsorted(rows, self.rows[kept])
        groups, stacks = [], []
        for group, stack in zip(self.groups, self.stacks):
            local = torch.nonzero(kept[group])[:, 0]
            if len(local):
                groups.append(new_index[group[local]])
                stacks.append(stack.narrowed(local))
        narrow = copy.copy(self)
        narrow._assemble(rows, groups, stacks)
        return narrow

    def __call__(self, row_delta: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states at the loss layer at (row, original position) pairs, with each row's delta
        (row_delta[row]) added to the edited layer's output at its fact token."""
        pieces, order = [], []
        for k, (group, stack) in enumerate(zip(self.groups, self.stacks)):
            asked = (self.group_of[rows] == k).nonzero()[:, 0]
            if not len(asked):
                continue
            added = torch.zeros_like(stack.hidden)
            added[:, 0] = row_delta[group.to(row_delta.device)].to(added.device, added.dtype)
            top = stack(added)
            local = self.local[rows[asked]]
            pieces.append(top[local.to(top.device), stack.column(local, positions[asked]).to(top.device)])
            order.append(asked)
        return torch.cat(pieces)[torch.argsort(torch.cat(order)).to(pieces[0].device)]


# Rebuild a replay stack of modules once the requests still optimised are at most this share of its rows.
REBUILD_FRACTION = 0.75


def _float32_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
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
        return _grouped_sdpa(query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0)), None


def _grouped_sdpa(query, key, value, mask, scale, dropout: float = 0.0, grouped: bool | None = None) -> torch.Tensor:
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


FLOAT32_SDPA = "kedit_float32_sdpa"
AttentionInterface.register(FLOAT32_SDPA, _float32_sdpa)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm on a float32 residual stream."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps))


@dataclass
class _LlamaWeights:
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
    grouped: bool  # kv_heads < heads, as a constant (see _grouped_sdpa)

    @staticmethod
    def of(layer: torch.nn.Module) -> "_LlamaWeights":
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return _LlamaWeights(
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, tuple(m.bias for m in linears),
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
            attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim, attn.scaling,
            attn.config.num_key_value_heads < attn.config.num_attention_heads)


def _is_plain_llama(layer: torch.nn.Module) -> bool:
    """A decoder layer whose forward is exactly transformers' LlamaDecoderLayer (what _llama_layer computes)."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    return (type(layer).__name__ == "LlamaDecoderLayer" and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "pretraining_tp", 1) > 1)


def _llama_layer(hidden, prefix_keys, prefix_values, cos, sin, mask, w: _LlamaWeights):
    """One replayed Llama decoder layer on the suffix, attending to the cached prefix: the same
    operations and dtypes as transformers' layer under autocast with _float32_sdpa (matmuls in the
    weights' dtype, residual stream, norms, rotary embeddings and attention in float32), written
    as one function so that torch.compile can fuse it (the module path goes through a cache)."""
    batch, length, _ = hidden.shape
    low = w.q.dtype
    linear = lambda x, weight, bias: torch.nn.functional.linear(x.to(low), weight, None if bias is None else bias.to(low))  # noqa: E731
    q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias = w.biases
    x = _rms_norm(hidden, w.input_norm, w.input_eps)
    query = linear(x, w.q, q_bias).view(batch, length, w.heads, w.head_dim).transpose(1, 2)
    key = linear(x, w.k, k_bias).view(batch, length, w.kv_heads, w.head_dim).transpose(1, 2)
    value = linear(x, w.v, v_bias).view(batch, length, w.kv_heads, w.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    key, value = torch.cat((prefix_keys, key), dim=-2), torch.cat((prefix_values, value), dim=-2)
    attended = _grouped_sdpa(query, key, value, mask[..., : key.shape[-2]], w.scaling, grouped=w.grouped).reshape(batch, length, w.heads * w.head_dim)
    hidden = hidden + linear(attended, w.o, o_bias)
    x = _rms_norm(hidden, w.mlp_norm, w.mlp_eps)
    x = torch.nn.functional.silu(linear(x, w.gate, gate_bias)) * linear(x, w.up, up_bias)
    return hidden + linear(x, w.down, down_bias)


_compiled_llama_layer = None


def _layer_function(compiled: bool):
    """_llama_layer, or (once per process) its torch.compile'd form with dynamic shapes."""
    global _compiled_llama_layer
    if not compiled:
        return _llama_layer
    if _compiled_llama_layer is None:
        _compiled_llama_layer = torch.compile(_llama_layer, dynamic=True)
    return _compiled_llama_layer


class _Replay:
    """The modules a step runs: the layers above the edited one, the final norm and the unembedding.

    Under mixed precision their matrices are copied once into that dtype: autocast would otherwise re-cast
    every weight at every step, which for a single request's few dozen tokens costs as much as the
    matmuls themselves. The copies are frozen snapshots, valid for one compute_values call (the
    edited matrices all lie at or below the edited layer). Modules placed by accelerate (hooks) are
    used as they are."""

    def __init__(self, lm: LoadedModel, layer: int, loss_layer: int, autocast: torch.dtype | None, compiled: bool = False):
        self.original_layers = [lm.model.get_submodule(lm.arch.layer(j)) for j in range(layer + 1, loss_layer + 1)]
        modules = [*self.original_layers, lm.model.get_submodule(lm.arch.final_norm), lm.model.get_submodule(lm.arch.unembed)]
        copied = autocast is not None and not any(hasattr(m, "_hf_hook") for m in modules)
        if copied:
            modules = [copy.deepcopy(m) for m in modules]
            for weight in (w for m in modules for w in m.parameters() if w.dim() >= 2):
                weight.data = weight.data.to(autocast)  # matrices only: norms keep their dtype
            for part in (p for m in modules for p in m.modules()):  # configs copied with the modules
                config = getattr(part, "config", None)
                if getattr(config, "_attn_implementation", None) == "sdpa":
                    config._attn_implementation = FLOAT32_SDPA
        *self.layers, self.norm, self.unembed = modules
        # Mixed precision on plain Llama layers of a float32 model: replay them as one function,
        # which torch.compile can fuse (`compiled`).
        plain = copied and self.layers and all(map(_is_plain_llama, self.layers)) and self.norm.weight.dtype == torch.float32
        self.llama = [_LlamaWeights.of(m) for m in self.layers] if plain else None
        self.layer_function = _layer_function(compiled)


def _log_probs(lm: LoadedModel, hidden: torch.Tensor, replay: _Replay | None = None) -> torch.Tensor:
    norm = replay.norm if replay else lm.model.get_submodule(lm.arch.final_norm)
    unembed = replay.unembed if replay else lm.model.get_submodule(lm.arch.unembed)
    logits = unembed(norm(hidden))
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _scatter_delta(hidden_like: torch.Tensor, view: _Active, delta_stack: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the active rows' hidden states, holding each row's delta at its fact
    token and zeros elsewhere."""
    device = hidden_like.device
    rows = torch.arange(len(view.rows), device=device)
    values = delta_stack[view.row_request.to(delta_stack.device)].to(device, hidden_like.dtype)
    return torch.zeros_like(hidden_like).index_put((rows, view.fact.to(device)), values)


def _fast_log_probs(lm, stack: _GroupedStack, view: _Active, delta_stack):
    row_delta = delta_stack[view.row_request.to(delta_stack.device)]
    rows, positions = torch.cat([view.t_row, view.kl_rows]), torch.cat([view.t_position, view.kl_positions])
    with stack.precision():
        # One unembedding call for targets and KL prompts: at a few rows it is bound by reading the vocab matrix.
        log_probs = _log_probs(lm, stack(row_delta, rows, positions), stack.replay)
    return log_probs[: len(view.t_row)], log_probs[len(view.t_row):]


def _full_log_probs(lm, batch: _Batch, layer: int, view: _Active, delta_stack):
    device = input_device(lm.model)
    with Trace(lm.model, lm.arch.layer(layer), edit_output=add_to_output(lambda h: _scatter_delta(h, view, delta_stack))):
        logits = lm.model(input_ids=batch.ids[view.rows].to(device), attention_mask=batch.mask[view.rows].to(device), use_cache=False).logits
    all_lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    device = all_lp.device
    return all_lp[view.t_row.to(device), view.t_position.to(device)], all_lp[view.kl_rows.to(device), view.kl_positions.to(device)]


def _per_request(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, owner.to(values.device), values)


def compute_values(
    lm: LoadedModel,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hparams: EditHyperParams,
    site: str = "mlp",
    fast: bool = True,
    chunk_size: int = 64,
    autocast: torch.dtype | None = None,
    compiled: bool = False,
) -> ValueResult:
    """Optimise one delta per request at `layer` (see the module docstring).

    Requests are independent, so large batches are optimised in chunks of `chunk_size` requests
    (bounded memory) with results identical to one batch. `autocast` (fast path only, e.g.
    torch.bfloat16) runs the replayed layers in mixed precision: several times faster on CPUs
    with native bfloat16 matmuls, at the cost of values that are no longer bitwise those of
    float32 (the deltas and Adam stay float32). `compiled` (with `autocast`, Llama models): the
    replayed layers run torch.compile'd (compiled once per process; values close to, not equal
    to, the eager ones)."""
    if len(requests) > chunk_size:
        parts = [compute_values(lm, requests[i:i + chunk_size], layer, templates, hparams, site, fast, chunk_size, autocast, compiled)
                 for i in range(0, len(requests), chunk_size)]
        return ValueResult(
            torch.cat([p.delta for p in parts]), torch.cat([p.reference for p in parts]),
            *(sum((getattr(p, name) for p in parts), []) for name in ("steps", "final_loss", "target_prob", "delta_ratio")),
        )
    batch = build_batch(lm, requests, templates, hparams.fact_token, hparams.kl_prompts, hparams.kl_position)
    n = len(requests)
    reference = _reference_vectors(lm, batch, lm.arch.down_proj(layer) if site == "mlp" else lm.arch.layer(layer))
    ref_norm = reference.norm(dim=-1)
    all_rows = torch.arange(len(batch.ids))
    stack = _GroupedStack(lm, layer, hparams.v_loss_layer, batch, all_rows, autocast, compiled=compiled) if fast else None
    device = stack.device if fast else reference.device
    # float32 deltas for half-precision models, float64 for float64 models (exactness tests)
    param_dtype = torch.promote_types(next(lm.model.parameters()).dtype, torch.float32)
    deltas = [torch.nn.Parameter(torch.zeros(reference.shape[1], device=device, dtype=param_dtype)) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    steps, final_loss, target_prob = [0] * n, [float("nan")] * n, [float("nan")] * n
    argmax_steps = [0] * n  # steps at which every target token was the argmax (MPES)
    # `members`: the requests the current view (and replay stack) covers; `active`: those still
    # optimised. A stack of replay functions is narrowed to the active rows at no cost; rebuilding a
    # stack of modules costs about two steps, so there finished requests stay in it (computed,
    # frozen, out of the loss) until a quarter of its rows are finished.
    members, kl_reference = list(range(n)), None
    active, view = set(members), _Active(batch, members, n)

    for step in range(hparams.v_num_grad_steps):
        delta_stack = torch.stack([deltas[i] for i in members])
        if fast:
            target_lp, kl_lp = _fast_log_probs(lm, stack, view, delta_stack)
        else:
            target_lp, kl_lp = _full_log_probs(lm, batch, layer, view, delta_stack)
        if kl_reference is None:  # first step: delta = 0, the original distribution
            kl_reference = dict(zip(view.kl_original.tolist(), kl_lp.detach()))
        loss, prob = _loss(hparams, batch, view, target_lp, kl_lp, kl_reference, delta_stack, ref_norm[view.requests].to(device), len(members))
        on_top = _targets_on_top(view, target_lp, len(members)) if hparams.v_argmax_stop_steps else torch.zeros_like(prob, dtype=torch.bool)
        # One host sync per step for the stopping rules (not one per request): float64 holds
        # float32 values exactly, so these are the numbers .item() would give.
        losses, probs, tops = torch.stack([loss.detach().double(), prob.double(), on_top.double()]).tolist()
        live = [False] * len(members)
        for k, i in enumerate(members):
            if i not in active:
                continue
            final_loss[i], target_prob[i] = losses[k], probs[k]
            argmax_steps[i] += bool(tops[k])
            live[k] = not (final_loss[i] < hparams.v_loss_threshold or step == hparams.v_num_grad_steps - 1
                           or 0 < hparams.v_argmax_stop_steps <= argmax_steps[i])
        if not any(live):
            break
        optimizer.zero_grad(set_to_none=True)
        loss[torch.tensor(live, device=loss.device)].sum().backward()
        for k, i in enumerate(members):
            if not live[k]:  # a zero gradient would still move Adam's momentum; None skips the parameter
                deltas[i].grad = None
        optimizer.step()
        active = {i for k, i in enumerate(members) if live[k]}
        if len(active) < len(members) and (not fast or stack.narrowable or len(active) <= REBUILD_FRACTION * len(members)):
            members = sorted(active)
            view = _Active(batch, members, n)
            if fast and stack.narrowable:
                stack = stack.narrowed(view.rows)
            elif fast:
                stack = _GroupedStack(lm, layer, hparams.v_loss_layer, batch, view.rows, autocast, stack.replay)
        with torch.no_grad():
            # ||delta|| <= clamp_norm_factor ||reference||, decided on the device (no sync per request):
            # a factor of exactly 1 leaves the deltas within the limit bitwise unchanged.
            order = sorted(active)
            for i in order:
                steps[i] += 1
            if order:
                norms = torch.stack([deltas[i].norm() for i in order])
                limits = hparams.clamp_norm_factor * ref_norm[order].to(norms.device)
                scales = torch.where(norms > limits, limits / norms, torch.ones_like(limits))
                for j, i in enumerate(order):
                    deltas[i].mul_(scales[j])

    delta = torch.stack([d.detach().cpu() for d in deltas])
    reference = reference.cpu()
    return ValueResult(delta, reference, steps, final_loss, target_prob, (delta.norm(dim=-1) / reference.norm(dim=-1)).tolist())


@torch.no_grad()
def _reference_vectors(lm: LoadedModel, batch: _Batch, module: str) -> torch.Tensor:
    """The edited output at each bare prompt's fact token, before editing."""
    device = input_device(lm.model)
    rows = batch.bare_row
    with Trace(lm.model, module, stop=True) as trace:
        lm.model(input_ids=batch.ids[rows].to(device), attention_mask=batch.mask[rows].to(device), use_cache=False)
    out = trace.output
    return out[torch.arange(len(rows), device=out.device), batch.fact_position[rows].to(out.device)].double()


def _targets_on_top(view: _Active, target_lp: torch.Tensor, n_active: int) -> torch.Tensor:
    """Per active request: is every target token the argmax after every templated prompt?"""
    wrong = (target_lp.argmax(-1) != view.t_token.to(target_lp.device)).double()
    per_row = _per_request(wrong, view.t_row, len(view.rows))
    return _per_request(per_row, view.row_request, n_active) == 0


def _loss(hparams, batch, view: _Active, target_lp, kl_lp, kl_reference, delta_stack, ref_norm, n_active):
    """Per active request: loss (differentiable) and mean target probability over its prompts."""
    device = target_lp.device
    token_nll = -target_lp.gather(1, view.t_token.to(device)[:, None])[:, 0]
    prompt_nll = _per_request(token_nll * view.t_share.to(device), view.t_row, len(view.rows))
    rewrite = view.rewrite_rows.to(device)
    owners = view.row_request[view.rewrite_rows]
    nll = _per_request(prompt_nll[rewrite], owners, n_active) / batch.n_prompts
    prob = _per_request(torch.exp(-prompt_nll[rewrite]).detach(), owners, n_active) / batch.n_prompts
    reference = torch.stack([kl_reference[r] for r in view.kl_original.tolist()]).to(kl_lp.device)
    kl_each = (kl_lp.exp() * (kl_lp - reference)).sum(-1)  # KL(new || original)
    kl_owners = view.row_request[view.kl_rows]
    kl = _per_request(kl_each, kl_owners, n_active) / _per_request(torch.ones_like(kl_each), kl_owners, n_active).clamp(min=1)
    # The papers' weight decay: ||delta|| / ||reference||^2 (not squared in ||delta||).
    decay = hparams.v_weight_decay * delta_stack.norm(dim=-1) / ref_norm**2
    return nll + hparams.kl_factor * kl.to(device) + decay.to(device), prob
