"""Replays: the log-probabilities the value loss reads, for the current deltas.

One protocol (`Replay`): `replay(deltas, view)` gives the log-probability distributions at every
read of the view's table (rome/values/layout.py), whatever its kind, with each active request's
delta added at its rows' fact token; `replay.only(view)` is the replay for fewer requests (those
of `view`, once others finished).
`make_replay` picks the implementation once, from (fast, architecture, value dtype, compile):

- `FullModel` (fast=False): the whole model with a hook, full logits; the straightforward path,
  kept to check equality and measure the speed-up.
- `ModuleReplay`: transformers' upper-layer modules (any architecture), replayed on the suffix
  of rows aligned at their fact token, attending to a cached prefix (a DynamicCache). Where the
  edited layer normalises its MLP output (util/arch.py `mlp_post_norm`: Gemma 2/3, OLMo 2) the
  delta joins the down projection's output before that norm, as the edit's output will.
- `LlamaReplay`: the same on plain Llama layers as one function (rome.values.llama_layer.llama_layer,
  equal to the modules to the bit), under mixed precision always, optionally torch.compile'd; in
  float32 only when compiled (on the model's own weights; uncompiled it is no faster than the modules).

Both fast replays group rows by suffix length (rome/values/stacks.py) and apply the final norm
and unembedding only at the positions the loss reads. What persists across calls (the compiled
function, the attention registered into transformers) is owned by a `ReplayRuntime` the caller
holds; nothing is registered or compiled at import.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rome.values import llama_layer
from rome.values.layout import Batch, View, align
from rome.values.stacks import Grouped, GroupedReads, LlamaStack, ModuleStack, UpperModules, log_softmax32
from util.models import LoadedModel, input_device
from util.nethook import Trace, add_to_output

FLOAT32_SDPA = "kedit_float32_sdpa"  # the name replayed modules' configs give float32_sdpa while they replay

# Rebuild a replay of modules once the requests still optimised are at most this share of its own.
REBUILD_FRACTION = 0.75


class Replay(Protocol):
    def __call__(self, deltas: torch.Tensor, view: View) -> torch.Tensor:
        """(reads, vocabulary) log-probs at the view's reads, in its table's order, with deltas[k]
        (the view's k-th request) added at its rows' fact token."""

    def only(self, view: View) -> "Replay":
        """This replay for the requests of `view`, a subset of its own."""


class ReplayRuntime:
    """What the replays keep across value optimisations, held by the caller (EditContext.replay):
    the torch.compile'd Llama layer function (compiling takes minutes on a CPU: once per runtime)
    and float32_sdpa, put into transformers' attention functions when a replay first needs it and
    taken out by `close`."""

    def __init__(self) -> None:
        self._compiled: Callable | None = None
        self._registered = False

    def layer_function(self, compiled: bool) -> Callable:
        if not compiled:
            return llama_layer.llama_layer
        if self._compiled is None:
            self._compiled = torch.compile(llama_layer.llama_layer, dynamic=True)
        return self._compiled

    def float32_attention(self) -> str:
        """The attention implementation name of float32_sdpa, registered now (idempotent)."""
        ALL_ATTENTION_FUNCTIONS[FLOAT32_SDPA] = llama_layer.float32_sdpa
        self._registered = True
        return FLOAT32_SDPA

    def close(self) -> None:
        if self._registered and FLOAT32_SDPA in ALL_ATTENTION_FUNCTIONS:
            del ALL_ATTENTION_FUNCTIONS[FLOAT32_SDPA]
        self._registered = False

    def __enter__(self) -> "ReplayRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_replay(lm: LoadedModel, batch: Batch, layer: int, loss_layer: int, *, runtime: ReplayRuntime, fast: bool = True,
                autocast: torch.dtype | None = None, compiled: bool = False) -> Replay:
    """The replay of all of `batch`'s rows, chosen once (see the module docstring)."""
    if not fast:
        return FullModel(lm, batch, layer)
    upper = UpperModules(lm, layer, loss_layer, autocast)
    rows = torch.arange(len(batch.ids))
    # Plain Llama layers of a float32 model as one function, which torch.compile can fuse: under mixed
    # precision (on bfloat16 copies of the weights), and in float32 when compiled (14-16% faster values on AVX2).
    functional = upper.copied or (compiled and upper.autocast is None and not upper.hooked)
    if (functional and upper.layers and lm.arch.llama_layers and all(map(llama_layer.is_plain_llama, upper.layers))
            and upper.norm.weight.dtype == torch.float32):
        weights, function = [llama_layer.LlamaWeights.of(m) for m in upper.layers], runtime.layer_function(compiled)
        return LlamaReplay(upper, lambda r: Grouped.of(
            batch, r, lambda g: LlamaStack(lm, upper, layer, loss_layer, align(batch, g, upper.device), weights, function)), rows)
    if upper.mixed:
        upper.use_attention(runtime.float32_attention())
    return ModuleReplay(upper, lambda r: Grouped.of(
        batch, r, lambda g: ModuleStack(lm, upper, layer, loss_layer, align(batch, g, upper.device))), rows)


class FullModel:
    """The straightforward path: the whole model, the delta added by a hook, full logits."""

    def __init__(self, lm: LoadedModel, batch: Batch, layer: int):
        self.lm, self.batch, self.layer = lm, batch, layer

    def __call__(self, deltas: torch.Tensor, view: View) -> torch.Tensor:
        lm, device = self.lm, input_device(self.lm.model)

        def added(hidden: torch.Tensor) -> torch.Tensor:  # each row's delta at its fact token, zeros elsewhere
            rows = torch.arange(len(view.rows), device=hidden.device)
            values = deltas[view.row_request.to(deltas.device)].to(hidden.device, hidden.dtype)
            return torch.zeros_like(hidden).index_put((rows, view.fact.to(hidden.device)), values)

        with Trace(lm.model, lm.arch.site(self.layer, "layer"), edit_output=add_to_output(added)):
            logits = lm.model(input_ids=self.batch.ids[view.rows].to(device), attention_mask=self.batch.mask[view.rows].to(device),
                              use_cache=False).logits
        log_probs = log_softmax32(logits)
        return log_probs[view.reads.row.to(log_probs.device), view.reads.position.to(log_probs.device)]

    def only(self, view: View) -> "FullModel":
        return self  # it runs the view's rows at every call


class _GroupedReplay:
    """Log-probs from a Grouped stack (`build(batch rows)`): the final norm and unembedding only
    where the loss reads."""

    def __init__(self, upper: UpperModules, build: Callable[[torch.Tensor], Grouped], rows: torch.Tensor, stack: Grouped | None = None):
        self.upper, self.build = upper, build
        self.stack = stack or build(rows)
        self._indices: tuple[View, torch.Tensor, torch.Tensor | None, GroupedReads] | None = None

    def indices(self, view: View, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, GroupedReads]:
        """(each view row's request, the view's rows among the stack's or None when they are all
        of them, the reads), on the devices they index: built at the first step of a view."""
        if self._indices is None or self._indices[0] is not view:
            local = torch.searchsorted(self.stack.rows, view.rows)  # the view's rows among the stack's
            self._indices = (view, view.on(device).row_request, local.to(device) if len(local) < len(self.stack.rows) else None,
                             self.stack.reads(local[view.reads.row], view.reads.position, device))
        return self._indices[1:]

    def __call__(self, deltas: torch.Tensor, view: View) -> torch.Tensor:
        row_request, local, reads = self.indices(view, deltas.device)
        row_delta = deltas[row_request]
        if local is not None:  # rows of finished requests: computed, not read (rows are independent)
            row_delta = row_delta.new_zeros(len(self.stack.rows), row_delta.shape[1]).index_copy(0, local, row_delta)
        with self.upper.precision():
            # One unembedding call for every read: at a few rows it is bound by reading the vocab matrix.
            return self.upper.log_probs(self.stack(row_delta, reads))


class LlamaReplay(_GroupedReplay):
    def only(self, view: View) -> "LlamaReplay":
        return LlamaReplay(self.upper, self.build, view.rows, self.stack.narrowed(view.rows))  # finished requests leave at no cost


class ModuleReplay(_GroupedReplay):
    """Rebuilding a stack of modules costs about two steps (its unedited forwards), so finished
    requests stay in it (computed, not read) until at most REBUILD_FRACTION of its rows are live."""

    def only(self, view: View) -> "ModuleReplay":
        if len(view.rows) > REBUILD_FRACTION * len(self.stack.rows):
            return self
        return ModuleReplay(self.upper, self.build, view.rows)
