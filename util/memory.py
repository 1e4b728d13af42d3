"""What fits in a device memory budget (`--max_gpu_memory`): requests per key forward and per value
optimisation batch, and tokens per statistics batch, from the model's shape. An upper-bound
estimate in bytes, written out so that it can be checked against the code it describes:

  w        bytes per element of the dtype a pass runs in (values under mixed precision: the
           model's dtype plus the autocast dtype, both copies of a matmul input are kept)
  d, m, V  hidden size, width of the edited MLP (keys), vocabulary; h heads, kv = key/value width
  T        tokens of the longest row (a templated prompt with its target), S the longest suffix
           from the fact token on (the part of a row value steps replay): both read off the
           edit's batch layout (rome/values/layout.py, `Batch.shape`), as are the rows and reads
  token    w (4 d + 3 m) + 4 h T: one token's live activations in a no-grad forward, with one
           layer's attention scores in float32

  resident  the parameters and buffers on the device, the edit's copy of each edited weight (d m w:
            its exact undo, `EditResult.originals`), plus per edited layer the solver's m x m float64
            matrices kept across edits (`solver_matrices`) when they are kept on the device
  keys      per request: templates x T x (token + w (m + d)), the retained down-projection input
            and site output included
  values    per request: rows x T x (token + 2 kv w (L_loss + L_up))   the unedited forward and its
                                                                      key/value caches
            + rows x S x L_up x (w (10 d + 4 m) + 4 h T)             what autograd keeps per
                                                                      replayed layer
            + reads x V x (w + 12) + kl x V x 4                       logits, log-softmax, its
                                                                      gradient and exp where the
                                                                      loss reads; KL references
            rows, reads, kl = the most rows, reads and KL reads of any request in the layout,
            L_up = layers replayed above the edited one, L_loss = layers up to the loss layer;
            once per batch under mixed precision: the replayed layers and unembedding copied in that
            dtype, only when some of their matrices are not in it already (`matrices_to_copy`:
            nothing for a bfloat16 model with bfloat16 values, whose own modules are replayed)
  solve     while one layer's C or system is built and solved, 3 m^2 x 8 (a float64 system, its
            factor, a product; the copy of the factor torch.cholesky_solve makes; AlphaEdit's
            eigendecomposition), 2 m^2 x 8 for equality solves (C0's copy and C before C is
            factorised), plus 2 d m x 8 (the solve's right-hand side K R^T and its solution Delta);
            plus, when the kept matrices live in host memory, that layer's kept matrices, moved in
            for its solve and freed after it. (Traced on an H200 at the Llama-3-8B shape, MEMIT batch 1:
            the five C, then the system, its factor, the factor's copy, K R^T and Delta, and the
            edited weights' copies.)

Placement of the kept matrices (`MemoryPlan.host`, decided by `plan` alone): on the edited weight's
device (always without a budget) when the edit fits with them resident in chunks as large as
without them (each chunk capped at the edit's requests), else in host memory (`SolverPlacement`:
pinned under CUDA), each moved to the device only while its layer is solved. Moving a layer's
matrices in costs some 20 ms per GiB over PCIe 5, far less than the value optimisation of the
extra chunks that keeping them resident would force (Llama-3-8B shape, bf16, batch 1,024 in
40 GiB, no bf16 replay copy: 69 requests per value batch in host placement, 21 on the device for
AlphaEdit and ENCORE).

A chunk holds as many requests as fit in HEADROOM of the budget once `resident` is taken (keys
and values run at different times, each with the whole room); the CUDA context itself is outside
torch's count and the budget. A budget that cannot hold one request stops with one line.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from util.arch import edited_weight
from util.errors import MemoryBudgetError
from util.models import LoadedModel

GIB = 1 << 30
HEADROOM = 0.9  # of the budget; the rest is left to the allocator's fragmentation
FLOAT64 = 8


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    mlp: int  # the edited down projection's input width m
    vocab: int
    layers: int
    heads: int
    kv: int  # width of one token's keys (= values) per layer
    width: int  # bytes per element of the weights

    @classmethod
    def of(cls, lm: LoadedModel) -> "ModelShape":
        config = lm.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        mlp = edited_weight(lm.model, lm.arch, 0).shape[1]  # GPT-2's config has no intermediate_size
        return cls(config.hidden_size, mlp, config.vocab_size, config.num_hidden_layers, heads, kv_heads * head_dim,
                   next(lm.model.parameters()).element_size())

    def token_bytes(self, width: int, tokens: int) -> int:
        """Live activations of one token in a no-grad forward over rows of `tokens` tokens."""
        return width * (4 * self.hidden + 3 * self.mlp) + 4 * self.heads * tokens


@dataclass(frozen=True)
class EditShape:
    """What one request of an edit puts through the model (rome/values/layout.py's Batch.shape)."""
    templates: int  # templated prompts (the key forward's rows)
    rows: int  # value optimisation rows of a request, the most of any
    reads: int  # distributions its loss reads, the most of any request
    kl_reads: int  # of which KL reads (their references are kept)
    tokens: int  # longest row
    suffix: int  # longest row part from the fact token on
    loss_layer: int
    edited_layer: int  # the last edited layer (values are optimised there)
    requests: int  # requests in the edit: a chunk larger than this buys nothing


def resident_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers that occupy device memory (not accelerate's 'meta' placeholders)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def solver_matrices(constraint: str, mom2_adjustment: bool, remember_keys: bool) -> tuple[int, int]:
    """m x m float64 matrices of the solver (see util/solve.py, rome/editor.py): (kept per edited
    layer, transient while one layer is solved). Kept: C (cached Covariance), its Cholesky factor
    for equality solves, K_p K_p^T (AlphaEdit, ENCORE), the null-space basis U (at most m x m;
    AlphaEdit needs no C)."""
    if constraint == "nullspace":
        return 1 + remember_keys, 3
    if constraint == "equality":
        return 2 * mom2_adjustment + remember_keys, 2 * mom2_adjustment
    return mom2_adjustment + remember_keys, 3


@dataclass(frozen=True)
class SolverPlacement:
    """Where the solver's kept m x m matrices (C and its factor, K_p K_p^T, AlphaEdit's U) live for a
    weight on `device`: there, or with `host` in host memory, pinned when `device` is a GPU so that
    moving one in for a solve is a fast, stream-ordered copy. Solves always run on `device`
    (util/solve.py moves what it is handed to the keys' device; those copies die with the solve)."""
    device: torch.device  # the edited weight's
    host: bool = False

    @property
    def kept_on(self) -> torch.device:
        return torch.device("cpu") if self.host else self.device

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where the matrices are kept: itself when it is there already, else a copy."""
        if not self.host:
            return tensor.to(self.device)
        pin = self.device.type == "cuda"
        if tensor.device.type == "cpu" and (not pin or tensor.is_pinned()):
            return tensor
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor)

    def add(self, kept: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        """kept + addend, formed where the matrices are kept, as a new tensor (a rollback mark of the
        run state may still hold `kept`)."""
        kept = self.keep(kept)
        total = torch.empty(kept.shape, dtype=kept.dtype, device=kept.device,
                            pin_memory=self.host and self.device.type == "cuda")
        return torch.add(kept, addend.to(kept.device), out=total)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int  # bytes
    weights: int  # the parameters and buffers on the device
    originals: int  # the edit's copies of the weights it edits (its exact undo)
    key_request: int
    value_request: int
    value_fixed: int
    kept: int  # the solver's matrices kept across edits, every edited layer
    kept_layer: int  # the same for one layer (moved in for its solve when kept in host memory)
    transient: int  # what one layer's solve allocates besides the kept matrices
    host: bool = False  # the kept matrices live in host memory
    model: str = "the model"

    @property
    def resident(self) -> int:
        return self.weights + self.originals + (0 if self.host else self.kept)

    @property
    def solve(self) -> int:
        return self.transient + (self.kept_layer if self.host else 0)

    @property
    def room(self) -> int:
        return int(self.budget * HEADROOM) - self.resident

    def phases(self) -> tuple[int, int, int]:
        """Bytes of one request's key forward, of its value optimisation, of one layer's solve."""
        return self.key_request, self.value_fixed + self.value_request, self.solve

    def fits(self) -> bool:
        """One request's every phase fits."""
        return self.room >= max(self.phases())

    def check(self) -> None:
        """Raise MemoryBudgetError (one line) unless one request's every phase fits."""
        if not self.fits():
            phases = self.phases()
            need = (self.resident + max(phases)) / HEADROOM
            raise MemoryBudgetError(
                f"max_gpu_memory {self.budget / GIB:.3g} GiB cannot hold an edit of {self.model}: weights, the copies of the edited ones"
                f"{'' if self.host else ' and solver matrices'} take {self.resident / GIB:.3g} GiB, then one request's key "
                f"forward {phases[0] / GIB:.3g} GiB, its value optimisation {phases[1] / GIB:.3g} GiB, a layer's solve "
                f"{phases[2] / GIB:.3g} GiB; give at least {need / GIB:.3g} GiB")

    def key_chunk(self) -> int:
        self.check()
        return int(self.room // self.key_request)

    def value_chunk(self) -> int:
        self.check()
        return int((self.room - self.value_fixed) // self.value_request)

    def used_chunks(self, requests: int) -> tuple[int, int]:
        """The chunks an edit of `requests` runs in: (keys, values), each at most `requests`."""
        return min(self.key_chunk(), requests), min(self.value_chunk(), requests)

    def peak(self, requests: int) -> int:
        """The estimated peak bytes of an edit of `requests`: what stays resident, then its largest
        phase (a key forward of its key chunk, a value batch of its value chunk, one layer's solve)."""
        keys, values = self.used_chunks(requests)
        return self.resident + max(keys * self.key_request, self.value_fixed + values * self.value_request, self.solve)


def matrices_to_copy(modules: list[torch.nn.Module], autocast: torch.dtype | None) -> list[torch.nn.Parameter]:
    """The matrices (parameters of two or more dimensions; norms keep their dtype) of a replay's
    `modules` that rome/values/replay.py's UpperModules copies once into the autocast dtype: all of them
    when some is not in that dtype (autocast would re-cast it at every step), none when all are
    (a bfloat16 model with bfloat16 values: the modules themselves run), none without autocast."""
    if autocast is None:
        return []
    matrices = [p for module in modules for p in module.parameters() if p.dim() >= 2]
    return matrices if any(p.dtype != autocast for p in matrices) else []


def replay_copy_bytes(modules: list[torch.nn.Module], autocast: torch.dtype | None) -> int:
    """Bytes of the copies `matrices_to_copy` names, in the autocast dtype (0 when nothing is copied)."""
    copies = matrices_to_copy(modules, autocast)
    return sum(p.numel() for p in copies) * torch.empty((), dtype=autocast).element_size() if copies else 0


def plan(model: torch.nn.Module, shape: ModelShape, edit: EditShape, budget_gib: float, autocast: torch.dtype | None,
         replayed: list[torch.nn.Module], n_layers_solved: int, matrices: tuple[int, int] = (0, 0), name: str = "the model",
         weights: int | None = None) -> MemoryPlan:
    """The estimate of the module docstring for one edit, with the kept matrices placed (on the
    device if they shrink none of the edit's chunks there, else in host memory); `matrices` as
    solver_matrices returns; `weights`: the bytes of the model on the device (default: `resident_bytes(model)`;
    give it for a model built on the 'meta' device to plan a shape without its memory)."""
    w, T = shape.width, edit.tokens
    w_values = w + (torch.empty((), dtype=autocast).element_size() if autocast is not None and autocast != next(model.parameters()).dtype else 0)
    up = edit.loss_layer - edit.edited_layer
    solver = FLOAT64 * shape.mlp ** 2
    key_request = edit.templates * T * (shape.token_bytes(w, T) + w * (shape.mlp + shape.hidden))
    rows = edit.rows
    value_request = (rows * T * (shape.token_bytes(w_values, T) + 2 * shape.kv * w_values * (edit.loss_layer + 1 + up))
                     + rows * edit.suffix * up * (w_values * (10 * shape.hidden + 4 * shape.mlp) + 4 * shape.heads * T)
                     + edit.reads * shape.vocab * (w_values + 12) + edit.kl_reads * shape.vocab * 4)
    on_device = MemoryPlan(
        budget=int(budget_gib * GIB), weights=resident_bytes(model) if weights is None else weights,
        originals=n_layers_solved * shape.hidden * shape.mlp * w,
        key_request=key_request, value_request=value_request, value_fixed=replay_copy_bytes(replayed, autocast),
        kept=n_layers_solved * matrices[0] * solver, kept_layer=matrices[0] * solver,
        transient=matrices[1] * solver + 2 * FLOAT64 * shape.hidden * shape.mlp, model=name,
    )
    in_host = replace(on_device, host=True)
    # the one placement decision: the device while the matrices cost the edit no chunk there
    # (a plan that fits on the device also fits in host: it frees all layers' matrices, moves one layer's in)
    if on_device.fits() and on_device.used_chunks(edit.requests) == in_host.used_chunks(edit.requests):
        return on_device
    return in_host


def stats_batch_tokens(shape: ModelShape, n_layers: int, width: int, window: int, free_bytes: int) -> int:
    """Tokens per key-statistics batch: per layer a float32 and a float64 Gram matrix (held all
    pass long, counted whole), then, in half of what is left (transient peaks), per token the
    truncated forward's live activations (`ModelShape.token_bytes` over windows of `window` tokens)
    and each layer's retained keys with their float32 copy. (Halving the Gram matrices' room too
    refused MEMIT's five layers of the Llama-3-8B shape under 40 GiB on an H200: 12.3 GB of Gram
    matrices beside 15 GB of weights, which fit with room to spare.)"""
    per_token = shape.token_bytes(width, window) + n_layers * shape.mlp * (width + 4)
    fixed = n_layers * shape.mlp ** 2 * (4 + FLOAT64)
    return max(0, (free_bytes - fixed) // 2 // per_token)

