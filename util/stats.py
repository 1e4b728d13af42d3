"""Key second-moment statistics C0 = E[k k^T] of the edited projection's inputs, per layer.

One forward pass over packed token windows serves every requested layer and stops after the
deepest one. Per batch the keys' Gram matrix is formed in float32 (float64 for float64
statistics) and added to a float64 running sum on the model's device, copied to the host once at
the end (a copy per batch held a GPU to a few thousand tokens/s). On a GPU the batch is sized
from its free memory. Results are cached on disk, keyed by everything they depend on (model,
layer module, corpus, token count, forward dtype), and held in memory by the `StatsCache` object
the caller owns. AlphaEdit's null-space basis of a C0 is cached next to it, keyed by the same
fields plus the eigenvalue threshold, so an eigendecomposition of m x m (minutes on a CPU for an
8B model's 14336) runs once per machine, not once per run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from util.arch import edited_weight
from util.checks import checked_tensor, read_tensors
from util.corpus import Corpus, token_windows
from util.errors import CacheError
from util.memory import ModelShape, stats_batch_tokens
from util.models import DTYPES, LoadedModel, input_device
from util.nethook import TraceDict
from util.paths import slug
from util.progress import progress as progress_bar
from util.solve import nullspace_basis

log = logging.getLogger(__name__)

DAMAGED = "a damaged cache file; delete it and it is computed again"


@dataclass(frozen=True)
class StatsKey:
    model: str
    module: str
    corpus: str
    n_tokens: int
    dtype: str

    def file_name(self) -> str:
        return f"{slug(self.module)}__{self.corpus}__t{self.n_tokens}__{self.dtype}.safetensors"


@dataclass(frozen=True)
class NullspaceKey:
    """AlphaEdit's basis U (P = U U^T) of the C0 under `stats`, eigenvalues below `threshold`."""
    stats: StatsKey
    threshold: float

    @property
    def model(self) -> str:
        return self.stats.model

    def file_name(self) -> str:
        return self.stats.file_name().removesuffix(".safetensors") + f"__null{float(self.threshold)!r}.safetensors"


@dataclass
class SecondMoment:
    mom2: torch.Tensor  # float64, m x m, E[k k^T]
    count: int  # keys averaged
    key: StatsKey


def accumulate_second_moments(
    lm: LoadedModel,
    layers: list[int],
    windows,
    n_windows: int,
    batch_size: int,
    dtype: str = "float32",
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int, float]:
    """Sum of k k^T (float64, on the host) per layer over all positions of the windows, accumulated
    on the model's device; returns (sums, number of keys, tokens per second)."""
    modules = {layer: lm.arch.down_proj(layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    device = input_device(lm.model)
    forward_dtype = DTYPES[dtype]
    # A half-precision forward of a float32 model runs under autocast (e.g. bfloat16 matmuls on CPUs
    # with avx512_bf16/AMX); keys are still accumulated in float64.
    use_autocast = forward_dtype in (torch.bfloat16, torch.float16) and forward_dtype != next(lm.model.parameters()).dtype
    if forward_dtype == torch.bfloat16 and not fast_bfloat16(device):
        log.warning("bfloat16 statistics requested, but this device has no native bfloat16 matmul: expect it to be slow")
    gram_dtype = torch.float64 if forward_dtype == torch.float64 else torch.float32  # float64 statistics end to end
    count = 0
    start = time.perf_counter()
    bar = progress_bar(total=n_windows, desc="key statistics", unit="window", disable=not progress)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal count
        ids = torch.stack(batch).to(device)
        with torch.inference_mode(), TraceDict(lm.model, modules.values(), retain_input=True, retain_output=False, stop=True) as traces:
            with torch.autocast(device.type, dtype=forward_dtype, enabled=use_autocast):
                lm.model(input_ids=ids, use_cache=False)
        for layer, name in modules.items():
            keys = traces[name].input.reshape(-1, traces[name].input.shape[-1]).to(gram_dtype)
            gram = (keys.T @ keys).double()
            sums[layer] = gram if layer not in sums else sums[layer].add_(gram)
        count += ids.numel()
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{count / (time.perf_counter() - start):.0f}")
        batch.clear()

    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    sums = {layer: total.cpu() for layer, total in sums.items()}  # the one copy to the host
    bar.close()
    return sums, count, count / max(time.perf_counter() - start, 1e-9)


CPU_BATCH_TOKENS = 8192
MAX_BATCH_TOKENS = 1 << 17


def batch_tokens_for(lm: LoadedModel, n_layers: int, dtype: str = "float32", window: int = 512,
                     free_bytes: int | None = None) -> int:
    """Tokens per statistics batch: what fits in `free_bytes` (util.memory.stats_batch_tokens: the
    Gram matrices, then the truncated forward's live activations and the retained keys in half of
    the rest), at most
    MAX_BATCH_TOKENS. free_bytes None: a GPU's free memory (torch.cuda.mem_get_info), or on the
    CPU a fixed CPU_BATCH_TOKENS."""
    if free_bytes is None:
        device = input_device(lm.model)
        if device.type != "cuda":
            return CPU_BATCH_TOKENS
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return min(MAX_BATCH_TOKENS, stats_batch_tokens(ModelShape.of(lm), n_layers, DTYPES[dtype].itemsize, window, free_bytes))


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively: a GPU, or a CPU with avx512_bf16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class StatsCache:
    """Second moments per (model, layer module, corpus, tokens, dtype), on disk and in memory."""

    def __init__(self, root: Path):
        self.root = Path(root)  # e.g. Caches.stats
        self._memory: dict[StatsKey, SecondMoment] = {}
        self._bases: dict[NullspaceKey, torch.Tensor] = {}  # host copies
        self.last_tokens_per_second: float | None = None

    def path(self, key: StatsKey | NullspaceKey) -> Path:
        return self.root / slug(key.model) / key.file_name()

    def second_moments(
        self,
        lm: LoadedModel,
        layers: list[int],
        corpus: Corpus,
        n_samples: int,
        sample_tokens: int,
        dtype: str = "float32",
        batch_tokens: int | Callable[[int], int] | None = None,
        progress: bool = True,
    ) -> dict[int, SecondMoment]:
        """C0 for each layer, from cache where present; the missing layers share one pass.
        batch_tokens: tokens per forward, or a function of the number of layers computed (called only
        when some are; None: batch_tokens_for, from a GPU's free memory)."""
        n_tokens = n_samples * sample_tokens
        keys = {layer: StatsKey(lm.name, lm.arch.down_proj(layer), corpus.ident, n_tokens, dtype) for layer in layers}
        result = {layer: self._load(key, edited_weight(lm.model, lm.arch, layer).shape[1]) for layer, key in keys.items()}
        missing = [layer for layer, value in result.items() if value is None]
        if missing:
            log.info("computing key statistics for layers %s over %d tokens of %s", missing, n_tokens, corpus.ident)
            windows = token_windows(corpus, lm.tok, sample_tokens, n_samples)
            if callable(batch_tokens):
                batch_tokens = batch_tokens(len(missing))
            batch_size = max(1, (batch_tokens or batch_tokens_for(lm, len(missing), dtype, sample_tokens)) // sample_tokens)
            sums, count, rate = accumulate_second_moments(lm, missing, windows, n_samples, batch_size, dtype, progress)
            self.last_tokens_per_second = rate
            log.info("key statistics: %d tokens at %.0f tokens/s", count, rate)
            for layer in missing:
                moment = SecondMoment(sums[layer] / count, count, keys[layer])
                self.store(moment)
                result[layer] = moment
        return result

    def _load(self, key: StatsKey, width: int) -> SecondMoment | None:
        """C0 of `key` (width x width) from memory or disk, checked (readable, square of the key
        width, finite, a count of keys above 0); None when not cached."""
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if not path.is_file():
            return None
        tensors = read_tensors(path, CacheError, DAMAGED)
        mom2 = checked_tensor(tensors, "mom2", (width, width), path, CacheError)
        count = int(checked_tensor(tensors, "count", (), path, CacheError).item())
        if count < 1:
            raise CacheError(f"{path}: tensor 'count' must be at least 1, got {count}: {DAMAGED}")
        moment = SecondMoment(mom2, count, key)
        self._memory[key] = moment
        return moment

    def store(self, moment: SecondMoment) -> None:
        self._write(self.path(moment.key), {"mom2": moment.mom2, "count": torch.tensor(moment.count)})
        self._memory[moment.key] = moment

    def nullspace(self, moment: SecondMoment, threshold: float, device: torch.device | str) -> torch.Tensor:
        """AlphaEdit's null-space basis U of `moment`'s C0 on `device`: from memory or disk, else
        computed there (eigh of m x m: seconds on a GPU) and stored next to C0."""
        key = NullspaceKey(moment.key, threshold)
        if key not in self._bases and self.path(key).is_file():
            path = self.path(key)
            self._bases[key] = checked_tensor(read_tensors(path, CacheError, DAMAGED), "basis", (moment.mom2.shape[0], None),
                                              path, CacheError)
        if key in self._bases:
            return self._bases[key].to(device)
        basis = nullspace_basis(moment.mom2.to(device), threshold)
        self.store_nullspace(key, basis)
        return basis

    def store_nullspace(self, key: NullspaceKey, basis: torch.Tensor) -> None:
        self._bases[key] = basis.cpu()
        self._write(self.path(key), {"basis": self._bases[key]})

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Atomically: a run killed mid-write leaves no truncated cache file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp))
        tmp.replace(path)
