"""What the fast replays run: the modules above the edited layer (`UpperModules`), one length
group's layers replayed on the suffix as transformers' modules (`ModuleStack`) or as one function
(`LlamaStack`), and the groups together (`Grouped`), read at the (row, position) pairs of a view's
reads. rome/values/replay.py builds replays from them.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from rome.values import llama_layer
from rome.values.layout import Aligned, Batch, suffix_groups
from util.memory import matrices_to_copy
from util.models import LoadedModel, input_device
from util.nethook import StopForward, Trace, hidden_of

def log_softmax32(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)



class UpperModules:
    """The modules a fast step runs: the layers above the edited one, the final norm and the
    unembedding. Under mixed precision (`mixed`) their matrices run in that dtype; when some is not
    in it yet they are all copied once into it (`copied`, util.memory.matrices_to_copy): autocast
    would otherwise re-cast every weight at every step, which for a single request's few dozen
    tokens costs as much as the matmuls. The copies are frozen snapshots, valid for one
    compute_values call (the edited matrices all lie at or below the edited layer). When every
    matrix already is in that dtype (a bfloat16 model with bfloat16 values) the model's own
    modules run: a copy would double them in memory for nothing. Modules placed by accelerate
    (hooks) are used as they are, without mixed precision's float32 attention."""

    def __init__(self, lm: LoadedModel, layer: int, loss_layer: int, autocast: torch.dtype | None):
        self.originals = [lm.model.get_submodule(lm.arch.layer(j)) for j in range(layer + 1, loss_layer + 1)]
        modules = [*self.originals, lm.model.get_submodule(lm.arch.final_norm), lm.model.get_submodule(lm.arch.unembed)]
        self.hooked = any(hasattr(m, "_hf_hook") for m in modules)
        self.mixed = autocast is not None and not self.hooked
        self.copied = self.mixed and bool(matrices_to_copy(modules, autocast))
        if self.copied:
            modules = [copy.deepcopy(m) for m in modules]
            for weight in matrices_to_copy(modules, autocast):
                weight.data = weight.data.to(autocast)
        *self.layers, self.norm, self.unembed = modules
        self.autocast, self.device = autocast, input_device(lm.model)
        self.final_logits = lambda logits: lm.arch.final_logits(lm.model.config, logits)  # noqa: E731 (soft-capping)
        # the edited layer's norm of its MLP output, if any: a value's delta is added before it (ArchSpec.site)
        self.post_norm = lm.model.get_submodule(lm.arch.mlp_post_norm.format(layer)) if lm.arch.mlp_post_norm else None
        self._attention: tuple[str, list] | None = None

    def use_attention(self, name: str) -> None:
        """Run the layers' sdpa attention as the implementation `name` while they replay (`attention`)."""
        configs = (getattr(p, "config", None) for m in self.layers for p in m.modules())
        # by identity: the model's own layers share one config (the model's), copies have their own
        sdpa = {id(c): c for c in configs if getattr(c, "_attn_implementation", None) == "sdpa"}
        self._attention = name, list(sdpa.values())

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """The attention `use_attention` named, for the duration of the block, the configs' own
        restored on exit: transformers reads `config._attn_implementation` at every forward, and the
        model's own modules share the config of the whole model (its other forwards keep sdpa)."""
        if self._attention is None:
            yield
            return
        name, configs = self._attention
        before = [c._attn_implementation for c in configs]
        try:
            for config in configs:
                config._attn_implementation = name
            yield
        finally:
            for config, implementation in zip(configs, before):
                config._attn_implementation = implementation

    def precision(self):
        """Mixed precision (e.g. bfloat16 matmuls) when asked for; a no-op otherwise."""
        return torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return log_softmax32(self.final_logits(self.unembed(self.norm(hidden))))

    def entering(self, hidden: torch.Tensor, mlp: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The edited layer's output (`hidden`, the suffix) as a function of the delta added at the
        value's site: hidden + added, or on a post-norm family hidden plus the change of the norm's
        output when the delta joins the down projection's output `mlp` (exactly 0 where it is 0)."""
        if self.post_norm is None:
            return lambda added: hidden + added
        mlp = mlp.to(hidden.dtype)
        normed = self.post_norm(mlp)
        return lambda added: hidden + (self.post_norm(mlp + added) - normed)

    def unedited_forward(self, lm: LoadedModel, layer: int, loss_layer: int, aligned: Aligned, cache: DynamicCache):
        """One forward without the delta over the aligned rows, up to the loss layer, filling
        `cache`: the edited layer's suffix output and each upper layer's (args, kwargs)."""
        calls = []
        handles = [m.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
                   for m in self.originals]
        try:
            with torch.no_grad(), self.precision(), Trace(lm.model, lm.arch.layer(layer)) as base, \
                    Trace(lm.model, lm.arch.layer(loss_layer), stop=True):
                lm.model(input_ids=aligned.ids, attention_mask=aligned.mask, position_ids=aligned.positions,
                         past_key_values=cache, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        return base.output[:, aligned.prefix:], calls


class ModuleStack:
    """One length group's upper layers replayed as transformers' modules on columns prefix.. (the
    suffix), attending to the cached prefix. Their arguments (masks, rotary embeddings, cache
    positions) are captured from one unedited suffix forward and replayed."""

    def __init__(self, lm: LoadedModel, upper: UpperModules, layer: int, loss_layer: int, aligned: Aligned):
        self.upper, self.modules, self.aligned = upper, upper.layers, aligned
        self.cache = DynamicCache()
        with Trace(lm.model, lm.arch.down_proj(layer)) if upper.post_norm else contextlib.nullcontext() as mlp:
            self.hidden, _ = upper.unedited_forward(lm, layer, loss_layer, aligned, self.cache)
        self.enter = upper.entering(self.hidden, mlp.output[:, aligned.prefix:] if mlp else None)
        self.prefix_kv = [(c.keys[..., : aligned.prefix, :], c.values[..., : aligned.prefix, :]) for c in self.cache.layers]
        self.calls: list[tuple[tuple, dict]] = []
        if not self.modules:
            return
        handles = [m.register_forward_pre_hook(self._capture, with_kwargs=True) for m in upper.originals]
        self._reset_cache()
        try:
            with torch.no_grad(), upper.precision():
                lm.model(input_ids=aligned.ids[:, aligned.prefix:], attention_mask=aligned.mask,
                         position_ids=aligned.positions[:, aligned.prefix:], past_key_values=self.cache, use_cache=True)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def _capture(self, module, args, kwargs):
        self.calls.append((args, kwargs))
        if len(self.calls) == len(self.modules):
            raise StopForward("captured the arguments of every upper layer")

    def _reset_cache(self) -> None:
        for cached, (keys, values) in zip(self.cache.layers, self.prefix_kv):
            cached.keys, cached.values = keys, values

    def __call__(self, added: torch.Tensor) -> torch.Tensor:
        """Suffix hidden states at the loss layer with `added` summed into the edited layer's output
        (before its MLP output's norm on a post-norm family)."""
        hidden = self.enter(added)
        self._reset_cache()
        with self.upper.attention():
            for module, (args, kwargs) in zip(self.modules, self.calls):
                out = module(hidden, *args[1:], **kwargs) if args else module(**{**kwargs, "hidden_states": hidden})
                hidden = hidden_of(out)
        return hidden


class LlamaStack:
    """One length group's upper Llama layers replayed by one function on the suffix: per layer the
    cached prefix's keys/values and the suffix rows of the mask and rotary embeddings, all per
    row, so that the stack narrows to fewer rows by slicing."""

    def __init__(self, lm: LoadedModel, upper: UpperModules, layer: int, loss_layer: int, aligned: Aligned,
                 weights: list[llama_layer.LlamaWeights], function: Callable):
        self.aligned, self.weights, self.function = aligned, weights, function
        cache = DynamicCache()
        self.hidden, calls = upper.unedited_forward(lm, layer, loss_layer, aligned, cache)
        prefix = aligned.prefix
        # Own tensors, not views, like those of narrowed stacks: torch.compile guards on the difference.
        own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
        self.kv = [(own(c.keys[..., :prefix, :]), own(c.values[..., :prefix, :])) for c in cache.layers[layer + 1:loss_layer + 1]]
        self.masks = [own(self._mask(kwargs.get("attention_mask"), aligned)) for _, kwargs in calls]
        self.rotary = [tuple(own(t[:, prefix:]) for t in kwargs["position_embeddings"]) for _, kwargs in calls]

    @staticmethod
    def _mask(mask: torch.Tensor | None, aligned: Aligned) -> torch.Tensor:
        """The suffix queries' rows of the layer's 4-d mask; transformers passes none when no row is
        padded (plain causal attention), which here is the causal mask shifted by the prefix."""
        if mask is not None:
            return mask[:, :, aligned.prefix:]
        width = aligned.ids.shape[1]
        return torch.ones(width - aligned.prefix, width, dtype=torch.bool, device=aligned.ids.device).tril(aligned.prefix)[None, None]

    def narrowed(self, local: torch.Tensor) -> "LlamaStack":
        """This stack on a subset of its rows (`local`), without a forward."""
        narrow = copy.copy(self)
        local = local.to(self.hidden.device)
        rows = lambda t: t[local] if len(t) == len(self.hidden) else t  # noqa: E731 (a batch dim of 1 broadcasts)
        narrow.hidden, narrow.aligned = self.hidden[local], self.aligned.narrowed(local)
        narrow.kv = [(keys[local], values[local]) for keys, values in self.kv]
        narrow.masks = [rows(mask) for mask in self.masks]
        narrow.rotary = [tuple(map(rows, pair)) for pair in self.rotary]
        return narrow

    def __call__(self, added: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden + added
        with torch.autocast(self.hidden.device.type, enabled=False):  # the function casts explicitly
            for weights, (keys, values), (cos, sin), mask in zip(self.weights, self.kv, self.rotary, self.masks):
                hidden = self.function(hidden, keys, values, cos, sin, mask, weights)
        return hidden


class Grouped:
    """Rows grouped by suffix length, one stack per group: one stack would pad every row to the
    longest suffix, which for a batch of 64 requests nearly doubles the tokens replayed per step."""

    def __init__(self, rows: torch.Tensor, groups: list[torch.Tensor], stacks: list):
        self.rows, self.groups, self.stacks = rows, groups, stacks  # rows: batch rows, ascending
        self.group_of, self.local = torch.empty(len(rows), dtype=torch.long), torch.empty(len(rows), dtype=torch.long)
        for k, g in enumerate(groups):
            self.group_of[g], self.local[g] = k, torch.arange(len(g))

    @staticmethod
    def of(batch: Batch, rows: torch.Tensor, make_stack: Callable[[torch.Tensor], object]) -> "Grouped":
        groups = suffix_groups(batch, rows)
        return Grouped(rows, groups, [make_stack(rows[g]) for g in groups])

    def narrowed(self, rows: torch.Tensor) -> "Grouped":
        """The stacks on `rows` (ascending batch rows, a subset of their own), sliced without a forward."""
        new_index = torch.full((len(self.rows),), -1, dtype=torch.long)
        kept = torch.isin(self.rows, rows)
        new_index[kept] = torch.searchsorted(rows, self.rows[kept])
        groups, stacks = [], []
        for group, stack in zip(self.groups, self.stacks):
            local = torch.nonzero(kept[group])[:, 0]
            if len(local):
                groups.append(new_index[group[local]])
                stacks.append(stack.narrowed(local))
        return Grouped(rows, groups, stacks)

    def reads(self, rows: torch.Tensor, positions: torch.Tensor, device: torch.device) -> "GroupedReads":
        """Where the (row, original position) pairs lie in the groups' outputs, as index tensors on
        the stacks' devices (computed and copied once per view, not per step)."""
        groups, order = [], []
        for k, (group, stack) in enumerate(zip(self.groups, self.stacks)):
            asked = (self.group_of[rows] == k).nonzero()[:, 0]
            if not len(asked):
                continue
            local = self.local[rows[asked]]
            at = stack.hidden.device
            groups.append((k, group.to(device), local.to(at), stack.aligned.column(local, positions[asked]).to(at)))
            order.append(asked)
        return GroupedReads(groups, torch.argsort(torch.cat(order)).to(self.stacks[groups[0][0]].hidden.device))

    def __call__(self, row_delta: torch.Tensor, reads: "GroupedReads") -> torch.Tensor:
        """Hidden states at the loss layer at `reads`' (row, original position) pairs, with each
        row's delta (row_delta[row]) added to the edited layer's output at its fact token."""
        pieces = []
        for k, group, local, column in reads.groups:
            stack = self.stacks[k]
            added = torch.zeros_like(stack.hidden)
            added[:, 0] = row_delta[group].to(added.device, added.dtype)
            pieces.append(stack(added)[local, column])
        return torch.cat(pieces)[reads.order]


@dataclass(frozen=True)
class GroupedReads:
    """Per group read: (group number, its batch rows on the deltas' device, local rows and suffix
    columns read on its stack's device); `order` puts the pieces back in the asked order."""
    groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    order: torch.Tensor
