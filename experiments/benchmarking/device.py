"""Editing at a model's own scale on one device (a GPU, or the CPU for a smoke run): seconds per
edit for each editor and batch size, tokens/s of key statistics, peak device memory and the GPU's
utilisation, each against the device's measured bfloat16 matmul peak. Run through
experiments/benchmark.py with --device or a `random:<shape>` model, e.g.

    python experiments/benchmark.py --device cuda --model_name random:llama-3-8b --dtype bfloat16 \\
        --hparams Llama-3-8B.yaml --algs R-ROME,EMMET,MEMIT,AlphaEdit,ENCORE --batches 1,64,1024

Statistics and templates are prepared before the timer (they are computed once per model); the
utilisation is the mean of nvidia-smi's (or pynvml's) samples over the timed span. With
--trace_memory (CUDA) each timed edit's allocator trace is replayed, and the blocks live at its peak
are listed by the lines of this repository that made them: how a peak above util/memory.py's plan
was explained (MEMIT at the Llama-3-8B shape, on an H200).
"""
from __future__ import annotations

import collections
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from editors import ALGORITHMS, load_algorithm_hparams
from rome.editor import EditContext, EditPlan
from util.corpus import local_corpus
from util.deltas import restore
from util.errors import KeditError
from util.models import LoadedModel, input_device
from util.paths import Caches
from util.stats import StatsCache

REPO = str(Path(__file__).resolve().parents[2])
TRACE_ENTRIES = 3_000_000  # allocator events kept; one edit at the Llama-3-8B shape makes far fewer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_on(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 10) -> float:
    """GFLOP/s of one large square product on `device`: the peak the figures are read against."""
    size = size if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _utilisation_sample(device: torch.device) -> float | None:
    try:
        return float(torch.cuda.utilization(device))  # needs pynvml
    except Exception:  # noqa: BLE001 (no pynvml / no NVML: fall back to nvidia-smi)
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                          f"--id={device.index or 0}"], capture_output=True, text=True, timeout=10)
    return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class PeakBlocks:
    """What was allocated at the peak of a replayed allocator trace, and the blocks then live that the
    trace saw allocated, grouped by where they were made: (where, bytes, blocks), largest first."""
    peak: int
    groups: list[tuple[str, int, int]]


@dataclass
class Usage:
    seconds: float
    peak_gib: float | None  # peak device memory allocated by torch (None on the CPU)
    utilisation: float | None  # mean GPU utilisation in percent (None where unknown)
    blocks: PeakBlocks | None = None  # with --trace_memory


def where_made(frames: list[dict], root: str = REPO, depth: int = 3) -> str:
    """The innermost `depth` frames of a block's stack that lie in this repository (not its venv),
    innermost first, as 'path:line function' joined by ' <- '."""
    ours = [f"{f['filename'][len(root) + 1:]}:{f.get('line')} {f.get('name')}" for f in frames
            if f.get("filename", "").startswith(root + "/") and "/.venv/" not in f["filename"]]
    return " <- ".join(ours[:depth]) or "(no frame of this repository)"


def blocks_at_peak(trace: list[dict], base: int, root: str = REPO) -> PeakBlocks:
    """Replay one device's allocator trace (torch.cuda.memory._snapshot()["device_traces"][i], with
    frames): the bytes allocated at its peak (`base`: allocated when the trace began) and the blocks
    the trace allocated that were live then, grouped by `where_made`."""
    def replay(events: list[dict]) -> tuple[dict[int, dict], int, int]:
        """The blocks live after `events` (by address), the peak bytes and the index of the event that reached it."""
        live: dict[int, dict] = {}
        current = peak = base
        peak_at = -1
        for index, event in enumerate(events):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                current += event["size"]
                if current > peak:
                    peak, peak_at = current, index
            elif event["action"] == "free_completed":  # a block from before the trace too (its size is in the event)
                current -= live.pop(event["addr"], event)["size"]
        return live, peak, peak_at

    # once to find the peak, once more up to it for what was live then (no copy of the live set per new peak)
    _, peak, peak_at = replay(trace)
    at_peak = replay(trace[:peak_at + 1])[0].values()
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in at_peak:
        where = where_made(event.get("frames", []), root)
        groups[where][0] += event["size"]
        groups[where][1] += 1
    return PeakBlocks(peak, sorted(((w, b, n) for w, (b, n) in groups.items()), key=lambda g: -g[1]))


class Traced:
    """Records the CUDA allocator's events (with Python frames) while open; `blocks` replays them."""

    def __enter__(self) -> "Traced":
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=TRACE_ENTRIES, stacks="python")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        device = torch.cuda.current_device()
        self.blocks = blocks_at_peak(snapshot["device_traces"][device], self.base)


class Measured:
    """Times a block on `device`; on CUDA also its peak memory and the GPU's mean utilisation
    (sampled every `interval` seconds in a background thread)."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            value = _utilisation_sample(self.device)
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> "Measured":
        cuda = self.device.type == "cuda"
        if cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        cuda = self.device.type == "cuda"
        if cuda:
            self._stop.set()
            self._thread.join()
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None
        self.usage = Usage(seconds, peak, sum(self.samples) / len(self.samples) if self.samples else None)


def bench_editor(lm: LoadedModel, requests, alg: str, hparams_file: str, overrides: list[str], ctx_args: dict,
                 trace: bool = False) -> Usage:
    """One edit of `requests` (one batch; ROME and r-ROME edit them one after another); with `trace`
    (CUDA), the blocks live at its peak."""
    hparams = load_algorithm_hparams(alg, hparams_file, overrides)
    ctx = EditContext(**ctx_args)
    # statistics, C and null spaces: once per run, not timed; under a budget made in host memory, from
    # where the edit moves them to the device if its plan keeps them there (never the other way round
    # while the measured peak counts them). Editors without a Solver prepare nothing.
    ctx.place(lm, EditPlan(host=ctx.config.max_gpu_memory is not None))
    if ALGORITHMS[alg].solver is not None:
        for layer in hparams.layers:
            if ALGORITHMS[alg].solver.constraint == "nullspace":  # AlphaEdit solves with U alone
                ctx.nullspace(lm, layer, hparams, hparams.nullspace_threshold)
            else:
                ctx.covariance(lm, layer, hparams)
        ctx.templates(lm, hparams)
    with Traced() if trace else contextlib.nullcontext() as traced, Measured(input_device(lm.model)) as measured:
        result = ALGORITHMS[alg].apply(lm, requests, hparams, ctx)
    if trace:
        measured.usage.blocks = traced.blocks
    restore(lm.model, result.originals)
    return measured.usage


def bench_statistics(lm: LoadedModel, corpus_path: str, layers: list[int], n_windows: int, sample_tokens: int, dtype: str,
                     caches: Caches) -> tuple[float, Usage]:
    """Tokens/s of the key statistics over `layers` (one pass, batch from the device's memory)."""
    corpus = local_corpus(corpus_path, caches)
    with tempfile.TemporaryDirectory() as tmp, Measured(input_device(lm.model)) as measured:
        cache = StatsCache(Path(tmp))
        cache.second_moments(lm, layers, corpus, n_windows, sample_tokens, dtype, progress=False)
    return cache.last_tokens_per_second, measured.usage


def _usage_note(usage: Usage, peak: float, flops: float | None = None) -> str:
    parts = []
    if flops is not None:
        parts.append(f"{flops / usage.seconds / 1e9:.0f} GFLOP/s = {100 * flops / usage.seconds / 1e9 / peak:.1f}% of the bf16 peak")
    parts.append(f"peak memory {usage.peak_gib:.1f} GiB" if usage.peak_gib is not None else "peak memory n/a (CPU)")
    parts.append(f"GPU utilisation {usage.utilisation:.0f}%" if usage.utilisation is not None else "GPU utilisation n/a")
    return "; ".join(parts)


def blocks_markdown(traced: dict[str, PeakBlocks], largest: int = 8, gib: int = 1 << 30) -> str:
    """Per traced edit, its peak and the `largest` groups of blocks then live (what the trace allocated)."""
    parts = []
    for name, blocks in traced.items():
        parts.append(f"{name}: peak {blocks.peak / gib:.2f} GiB; live then, beyond what was allocated before the edit:")
        parts += [f"  {size / gib:8.3f} GiB in {n:4d} blocks  {where}" for where, size, n in blocks.groups[:largest]]
    return "\n".join(parts)


def device_report(lm: LoadedModel, records, algs: list[str], batches: list[int], hparams_file: str, overrides: list[str],
                  corpus_path: str, stats_windows: int, stats_dtype: str, ctx_args: dict, trace: bool = False) -> int:
    """Print the table: per editor and batch size s/edit, then statistics tokens/s; with `trace`
    (CUDA), then the blocks live at each edit's peak. An editor that stops with a KeditError gets
    its one-line error as its row and the others still run; returns how many did."""
    device = input_device(lm.model)
    peak = matmul_peak_on(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{lm.name} ({sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, "
          f"{next(lm.model.parameters()).dtype}) on {name}; measured bf16 matmul peak {peak:.0f} GFLOP/s\n")
    print("| what | figure | device use |\n|---|---|---|")
    failed = 0
    traced: dict[str, PeakBlocks] = {}
    for alg in algs:
        for batch in batches:
            try:
                usage = bench_editor(lm, [r.request for r in records[:batch]], alg, hparams_file, overrides, ctx_args, trace)
            except KeditError as err:
                print(f"| {alg} batch {batch} | error: {err} | |", flush=True)
                failed += 1
                break  # its larger batches would stop the same way
            print(f"| {alg} batch {batch} | {usage.seconds / batch:.3g} s/edit | {_usage_note(usage, peak)} |", flush=True)
            if usage.blocks is not None:
                traced[f"{alg} batch {batch}"] = usage.blocks
    solving = [alg for alg in algs if ALGORITHMS[alg].solver is not None]  # the editors that read key statistics
    if stats_windows and solving:
        layers = load_algorithm_hparams(solving[0], hparams_file, overrides).layers
        config = lm.model.config
        # per token, the matmuls of the layers run (2 FLOPs per weight) and each layer's Gram update
        depth = max(layers) + 1
        per_layer = 2 * (config.hidden_size * (config.hidden_size + 2 * config.num_key_value_heads * config.hidden_size // config.num_attention_heads)
                         + config.hidden_size * config.hidden_size + 3 * config.hidden_size * config.intermediate_size)
        flops_per_token = depth * per_layer + len(layers) * 2 * config.intermediate_size**2
        rate, usage = bench_statistics(lm, corpus_path, layers, stats_windows, 512, stats_dtype, ctx_args["caches"])
        tokens = stats_windows * 512
        print(f"| key statistics, layers {layers}, {tokens} tokens, {stats_dtype} | {rate:.0f} tokens/s | "
              f"{_usage_note(usage, peak, flops_per_token * tokens)} |", flush=True)
    if traced:
        print(f"\n{blocks_markdown(traced)}", flush=True)
    return failed
