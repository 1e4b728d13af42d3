"""Speed of every phase on this machine, each against the straightforward path in the same run.

    python experiments/benchmark.py --data_dir ../shared/data            # all phases (~1-2 h)
    python experiments/benchmark.py --phases rome,stats --batches 16     # a subset
    (phases: rome, values8 (8 requests batched vs separate), batch, stats, eval;
     compiled: EMMET's values of 16 requests eager vs --value_compile, not in the default set)
    python experiments/benchmark.py --device cuda --model_name random:llama-3-8b --dtype bfloat16 --hparams Llama-3-8B.yaml
    (on a device or a random:<shape> model: s/edit per editor and batch, statistics tokens/s, peak
    memory and GPU utilisation against the bf16 matmul peak; see experiments/benchmarking/device.py)
    python experiments/benchmark.py --plan --model_name random:llama-3-8b --dtype bfloat16 --value_dtype bfloat16 \
        --hparams Llama-3-8B.yaml --batches 1,1024 --max_gpu_memory 40
    (no device: the memory plan of each editor and batch, experiments/benchmarking/plan.py)

Straightforward paths: value optimisation through the full model with full logits, one request
at a time (the papers' harness; for large batches timed on a few requests and scaled, marked
"est."); statistics from a full-model forward over padded articles; evaluation with one forward
per prompt. GFLOP/s counts the matmuls of value optimisation (torch's FLOP counter) over its time,
next to a measured matmul peak of this machine (one large square product) and to the same
matmuls timed alone at their own shapes (the most the value optimisation's matrices allow).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from data.cases import load_cases
from editors import ALGORITHMS, load_algorithm_hparams
from experiments.benchmarking.evaluation import bench_counterfact, bench_probe, timed
from experiments.benchmarking.device import device_report
from experiments.benchmarking.plan import plan_rows, plan_table
from rome.compute_v import ValueSettings, compute_values
from rome.editor import EditContext
from rome.values.layout import build_batch
from rome.values.replay import ReplayRuntime, make_replay
from util.cli import run_cli
from util.corpus import local_corpus, read_texts, local_files
from util.deltas import restore
from util.environment import Environment
from util.models import LoadedModel, load_model, shape_model
from util.paths import Caches
from util.stats import StatsCache, fast_bfloat16


def matmul_peak(dtype=torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of one large square product: the machine's matmul peak."""
    return matmul_ceiling({((size, size), (size, size), dtype): 1}, repeats)


class MatmulShapes(TorchDispatchMode):
    """Counts the matrix products a computation runs, by operand shapes and dtype."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.bmm.default: (0, 1)}

    def __init__(self):
        super().__init__()
        self.counts: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            a, b = (args[i] for i in self.OPS[func])
            key = (tuple(a.shape), tuple(b.shape), a.dtype)
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def matmul_ceiling(counts: dict[tuple, int], repeats: int = 20) -> float:
    """GFLOP/s of the counted products, each shape timed alone: what the matmuls of a computation
    reach on this machine without any other work around them."""
    flops = seconds = 0.0
    for (shape_a, shape_b, dtype), count in counts.items():
        a, b = torch.randn(shape_a, dtype=dtype), torch.randn(shape_b, dtype=dtype)
        a @ b
        _, each = timed(lambda: [a @ b for _ in range(repeats)])
        flops += count * 2 * shape_a[-2] * shape_a[-1] * shape_b[-1] * (shape_a[0] if len(shape_a) == 3 else 1)
        seconds += count * each / repeats
    return flops / seconds / 1e9


def _settings(ctx_args: dict, compiled: bool | None = None) -> ValueSettings:
    """The fast value optimisation of --value_dtype (and --value_compile, unless `compiled` says)."""
    autocast = None if ctx_args["value_dtype"] == "float32" else getattr(torch, ctx_args["value_dtype"])
    return ValueSettings(autocast=autocast, compiled=ctx_args["value_compile"] if compiled is None else compiled)


def bench_rome(lm: LoadedModel, records, alg: str, ctx_args: dict) -> dict:
    """Seconds per edit (whole edit: values, keys, solve) fast and straightforward, and the
    achieved GFLOP/s of the fast value optimisation."""
    hparams = load_algorithm_hparams(alg, "smollm2-135m.yaml")
    times = {}
    for fast in (True, False):
        ctx = EditContext(fast=fast, **{**ctx_args, **({} if fast else {"value_dtype": "float32", "value_compile": False})})
        ctx.covariance(lm, hparams.layers[0], hparams)  # statistics are not part of an edit
        ctx.templates(lm, hparams)
        start = time.perf_counter()
        for record in records:
            restore(lm.model, ALGORITHMS[alg].apply(lm, [record.request], hparams, ctx).originals)
        times[fast] = (time.perf_counter() - start) / len(records)
    ctx = EditContext(**ctx_args)
    templates = ctx.templates(lm, hparams)
    request = records[0].request
    _, seconds = timed(compute_values, lm, [request], hparams.layers[0], templates, hparams, settings=_settings(ctx_args), runtime=ctx.replay)
    with FlopCounterMode(display=False) as counter, MatmulShapes() as shapes:
        compute_values(lm, [request], hparams.layers[0], templates, hparams, settings=_settings(ctx_args, False), runtime=ctx.replay)
    return {"fast": times[True], "slow": times[False], "gflops": counter.get_total_flops() / seconds / 1e9,
            "matmul_ceiling": matmul_ceiling(shapes.counts)}


def compile_warm_up(lm: LoadedModel, records, ctx_args: dict) -> float:
    """Seconds to compile the replayed layers: a few steps on one request and on eight (row
    groups of one row and of several, the shapes torch.compile specialises on)."""
    hparams = dataclasses.replace(load_algorithm_hparams("EMMET", "smollm2-135m.yaml"), v_num_grad_steps=2)
    templates = EditContext(**ctx_args).templates(lm, hparams)  # sampled before the timer
    start = time.perf_counter()
    for n in (1, 8):
        compute_values(lm, [r.request for r in records[:n]], hparams.layers[-1], templates, hparams, "layer", _settings(ctx_args, True),
                       ctx_args["replay"])
    return time.perf_counter() - start


def bench_batch(lm: LoadedModel, records, alg: str, batch: int, ctx_args: dict, naive_requests: int) -> dict:
    """Seconds per edit for one batch; the straightforward figure optimises values one request at
    a time through the full model (timed on `naive_requests` requests and scaled to the batch).
    Editors without value optimisation (fine-tuning, UltraEdit: no Solver) have no such figure."""
    hparams = load_algorithm_hparams(alg, "smollm2-135m.yaml")
    ctx = EditContext(**ctx_args)
    requests = [r.request for r in records[:batch]]
    if ALGORITHMS[alg].solver is None:
        result, fast = timed(ALGORITHMS[alg].apply, lm, requests, hparams, ctx)
        restore(lm.model, result.originals)
        return {"batch": batch, "fast": fast / batch, "slow": None, "estimated": False, "steps": None}
    for layer in hparams.layers:
        ctx.covariance(lm, layer, hparams)
    templates = ctx.templates(lm, hparams)
    result, fast = timed(ALGORITHMS[alg].apply, lm, requests, hparams, ctx)
    restore(lm.model, result.originals)
    values_fast = sum(v["v_steps"] for v in result.requests)
    sample = requests[:naive_requests]
    naive = ValueSettings(fast=False)
    _, naive_values = timed(lambda: [compute_values(lm, [r], hparams.layers[-1], templates, hparams, "layer", naive) for r in sample])
    _, fast_values = timed(compute_values, lm, sample, hparams.layers[-1], templates, hparams, "layer", _settings(ctx_args), ctx.replay)
    slow = fast / batch - fast_values / len(sample) + naive_values / len(sample)
    return {"batch": batch, "fast": fast / batch, "slow": slow, "estimated": len(sample) < batch, "steps": values_fast / batch}


def bench_values_batched(lm: LoadedModel, records, ctx_args: dict, n: int = 8) -> dict:
    """r-ROME value optimisation of n requests in one batch vs n separate calls: seconds and the
    largest relative difference of v* between the two."""
    hparams = load_algorithm_hparams("R-ROME", "smollm2-135m.yaml")
    templates = EditContext(**ctx_args).templates(lm, hparams)
    requests, settings = [r.request for r in records[:n]], _settings(ctx_args, False)
    # warm-up (allocator, weight copies), so that neither timing pays first-call costs
    compute_values(lm, requests[:1], hparams.layers[0], templates, dataclasses.replace(hparams, v_num_grad_steps=2), settings=settings)
    together, batched = timed(compute_values, lm, requests, hparams.layers[0], templates, hparams, settings=settings)
    alone, separate = timed(lambda: [compute_values(lm, [r], hparams.layers[0], templates, hparams, settings=settings) for r in requests])
    target = torch.cat([a.target for a in alone])
    error = ((together.target - target).norm(dim=-1) / target.norm(dim=-1)).max().item()
    return {"batched": batched / n, "separate": separate / n, "error": error}


def bench_compiled(lm: LoadedModel, records, ctx_args: dict, n: int = 16, rounds: int = 2) -> dict:
    """EMMET's value optimisation of n requests, eager and with the replayed layers compiled (the
    runtime's compiled function, warmed up by the caller), alternately `rounds` times: the mean
    seconds per request of each and the steps per request (the same for both)."""
    hparams = load_algorithm_hparams("EMMET", "smollm2-135m.yaml")
    templates = EditContext(**ctx_args).templates(lm, hparams)
    requests, seconds, steps = [r.request for r in records[:n]], {False: [], True: []}, set()
    for _ in range(rounds):
        for compiled in (False, True):
            result, taken = timed(compute_values, lm, requests, hparams.layers[-1], templates, hparams,
                                  settings=_settings(ctx_args, compiled), runtime=ctx_args["replay"])
            seconds[compiled].append(taken / n)
            steps.add(sum(result.steps) / n)
    return {"eager": sum(seconds[False]) / rounds, "compiled": sum(seconds[True]) / rounds, "steps": sorted(steps)}


def naive_statistics(lm: LoadedModel, layer: int, texts, n_tokens: int, max_len: int = 512, batch: int = 8) -> float:
    """Tokens/s of the straightforward statistics pass: padded articles through the whole model."""
    module = lm.model.get_submodule(lm.arch.down_proj(layer))
    total, count, keys = None, 0, []
    handle = module.register_forward_hook(lambda m, a, o: keys.append(a[0]))
    start = time.perf_counter()
    try:
        pending = []
        for text in texts:
            pending.append(text)
            if len(pending) < batch:
                continue
            enc = lm.tok(pending, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
            pending.clear()
            with torch.no_grad():
                lm.model(**enc)
            k = keys.pop()[enc["attention_mask"].bool()].double()
            total = k.T @ k if total is None else total + k.T @ k
            count += len(k)
            if count >= n_tokens:
                break
    finally:
        handle.remove()
    return count / (time.perf_counter() - start)


def bench_stats(lm: LoadedModel, corpus_path: str, n_windows: int, layer: int, caches: Caches) -> dict:
    corpus = local_corpus(corpus_path, caches)
    rates = {}
    for dtype in ["float32"] + (["bfloat16"] if fast_bfloat16(torch.device("cpu")) else []):
        with tempfile.TemporaryDirectory() as tmp:
            cache = StatsCache(Path(tmp))
            cache.second_moments(lm, [layer], corpus, n_windows, 512, dtype, progress=False)
            rates[dtype] = cache.last_tokens_per_second
    rates["naive"] = naive_statistics(lm, layer, read_texts(local_files(Path(corpus_path))), n_windows * 512)
    return rates


REPLAYS = {"LlamaReplay": "the functional Llama layers (rome/values/llama_layer.py)",
           "ModuleReplay": "transformers' modules of the upper layers", "FullModel": "the full model"}


def replay_path(lm: LoadedModel, request, hparams, value_dtype: str, compiled: bool = False) -> str:
    """Which replay the fast value optimisation takes on `lm` (rome/values/replay.py's factory, asked
    once for one request at the hparams' last edited layer), in words."""
    batch = build_batch(lm, [request], ["{}"], hparams)
    autocast = None if value_dtype == "float32" else getattr(torch, value_dtype)
    with ReplayRuntime() as runtime:
        chosen = make_replay(lm, batch, hparams.layers[-1], hparams.v_loss_layer, runtime=runtime, autocast=autocast,
                             compiled=compiled)
    name = type(chosen).__name__
    return f"value replay of {lm.name} ({lm.model.config.model_type}, values in {value_dtype}): {name}, {REPLAYS.get(name, name)}"


def row(name: str, fast: float, slow: float | None, unit: str, note: str = "") -> str:
    if slow is None:  # nothing straightforward to set against it
        return f"| {name} | {fast:.3g} {unit} | - | - | {note} |"
    return f"| {name} | {fast:.3g} {unit} | {slow:.3g} {unit} | {slow / fast if unit.startswith('s/') else fast / slow:.1f}x | {note} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--phases", default="rome,values8,batch,stats,eval")
    parser.add_argument("--batches", default="16,64,256,1024")
    parser.add_argument("--batch_algs", default="EMMET,MEMIT", help="editors of the batch phase (any of editors.py's, e.g. FT-L,FT-M,UltraEdit)")
    parser.add_argument("--rome_edits", type=int, default=3)
    parser.add_argument("--naive_requests", type=int, default=2, help="requests timed on the straightforward batch path")
    parser.add_argument("--stats_windows", type=int, default=32)
    parser.add_argument("--value_dtype", default="float32", help="dtype of the fast value optimisation (bfloat16: mixed precision)")
    parser.add_argument("--value_compile", action="store_true", help="torch.compile the replayed Llama layers")
    parser.add_argument("--model_name", default="smollm2-135m", help="a model name, or random:<shape> (util/models.py RANDOM_SHAPES)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", help="the model's dtype (device report)")
    parser.add_argument("--hparams", default="smollm2-135m.yaml", help="hparams file per editor (device report)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="hparams override (device report)")
    parser.add_argument("--algs", default="R-ROME,EMMET,MEMIT,AlphaEdit,ENCORE", help="editors of the device report")
    parser.add_argument("--key_chunk_size", type=int, default=None, help="requests per key forward (device report; bounds memory; default from --max_gpu_memory, else 256)")
    parser.add_argument("--value_chunk_size", type=int, default=None, help="requests per value optimisation batch (device report; bounds memory; default from --max_gpu_memory, else 64)")
    parser.add_argument("--max_gpu_memory", type=float, default=None, metavar="GiB", help="device memory an edit may hold (device report; sets the chunk sizes)")
    parser.add_argument("--trace_memory", action="store_true", help="device report on CUDA: after the table, the blocks live "
                        "at each timed edit's peak, by the lines of this repository that made them (an allocator trace, replayed)")
    parser.add_argument("--plan", action="store_true", help="print util/memory.py's plan per editor and batch within "
                        "--max_gpu_memory for --model_name's shape (no weights, no device, nothing timed)")
    args = parser.parse_args()
    if args.plan:
        if args.max_gpu_memory is None:
            parser.error("--plan needs --max_gpu_memory GiB")
        return plan_main(args)
    if args.trace_memory and args.device != "cuda":
        parser.error("--trace_memory needs --device cuda (it replays the CUDA allocator's trace)")
    if args.device != "cpu" or args.model_name != "smollm2-135m":
        return device_main(args)
    phases = set(args.phases.split(","))
    caches = Environment.read().caches
    lm = load_model("smollm2-135m", model_cache=caches.models)
    corpus = str(Path(args.data_dir) / "wiki")
    # one ReplayRuntime for every context: the replayed layers are compiled once
    ctx_args = {"caches": caches, "corpus_path": corpus, "value_dtype": args.value_dtype, "value_compile": args.value_compile,
                "replay": ReplayRuntime()}
    batches = [int(b) for b in args.batches.split(",")]
    records = load_cases("cf", args.data_dir, limit=max(batches + [args.rome_edits, 16]))
    # bfloat16's peak only where it is native or asked for: emulated (AVX2 alone), the 2048^3 products take minutes
    bf16 = fast_bfloat16(torch.device("cpu")) or args.value_dtype == "bfloat16"
    peaks = {"float32": matmul_peak(), **({"bfloat16": matmul_peak(torch.bfloat16)} if bf16 else {})}
    peak = peaks.get(args.value_dtype, peaks["float32"])
    print(f"smollm2-135m on {torch.get_num_threads()} threads, fast value optimisation in {args.value_dtype}; matmul peak "
          + ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in peaks.items())
          + ("" if bf16 else " (bfloat16 not native here: not measured)"))
    print(replay_path(lm, records[0].request, load_algorithm_hparams("R-ROME", "smollm2-135m.yaml"), args.value_dtype,
                      args.value_compile) + "\n")
    if args.value_compile or "compiled" in phases:  # compiled once per process: not part of any edit's time
        print(f"torch.compile of the replayed layers: {compile_warm_up(lm, records, ctx_args):.0f} s\n")
    print("| phase | fast | straightforward | ratio | note |\n|---|---|---|---|---|")
    if "rome" in phases:
        for alg in ("R-ROME", "ROME"):
            r = bench_rome(lm, records[: args.rome_edits], alg, ctx_args)
            print(row(f"{alg} edit", r["fast"], r["slow"], "s/edit",
                      f"value optimisation at {r['gflops']:.0f} GFLOP/s = {100 * r['gflops'] / peak:.0f}% of the {args.value_dtype} peak; "
                      f"its matmuls alone at their shapes {r['matmul_ceiling']:.0f} GFLOP/s = {100 * r['matmul_ceiling'] / peak:.0f}%"), flush=True)
    if "values8" in phases:
        v = bench_values_batched(lm, records, ctx_args)
        print(row("r-ROME values, 8 requests batched vs separate", v["batched"], v["separate"], "s/request",
                  f"max relative difference of v* {v['error']:.1e}"), flush=True)
    if "compiled" in phases:
        c = bench_compiled(lm, records, ctx_args)
        print(row("EMMET values of 16 requests, compiled vs eager replay", c["compiled"], c["eager"], "s/request",
                  f"{args.value_dtype}; steps/request {', '.join(f'{s:.1f}' for s in c['steps'])}"), flush=True)
    if "batch" in phases:
        for alg in args.batch_algs.split(","):
            single = bench_batch(lm, records, alg, 1, ctx_args, 1)
            print(row(f"{alg} batch 1", single["fast"], single["slow"], "s/edit"), flush=True)
            for batch in batches:
                b = bench_batch(lm, records, alg, batch, ctx_args, args.naive_requests)
                note = f"{b['fast'] / single['fast']:.2f} of single-edit time" + (f"; {b['steps']:.1f} steps/request" if b["steps"] is not None else "")
                print(row(f"{alg} batch {batch}", b["fast"], b["slow"], "s/edit", note + (" (straightforward est.)" if b["estimated"] else "")), flush=True)
    if "stats" in phases:
        s = bench_stats(lm, corpus, args.stats_windows, 4, caches)
        best = max(v for k, v in s.items() if k != "naive")
        print(row("statistics (layer 4)", best, s["naive"], "tokens/s",
                  ", ".join(f"{k} {v:.0f}" for k, v in s.items() if k != "naive")), flush=True)
    if "eval" in phases:
        cf = bench_counterfact(lm, args.data_dir, 20)
        print(row("CounterFact evaluation", cf["fast"], cf["slow"], "s/record", f"max |dNLL| {cf['max_dnll']:.1e}"), flush=True)
        for task in ("sst2", "mmlu"):
            pr = bench_probe(lm, args.data_dir, task, 30, 3)
            print(row(f"probe {task} (3-shot)", pr["fast"], pr["slow"], "s/item", f"same labels {pr['agree']:.0%}"), flush=True)
    return 0


def plan_main(args) -> int:
    """The memory plan (experiments/benchmarking/plan.py) for --model_name's shape."""
    lm = shape_model(args.model_name, args.dtype, model_cache=Environment.read().caches.models)
    batches = [int(b) for b in args.batches.split(",")]
    requests = [r.request for r in load_cases("cf", args.data_dir, limit=max(batches))]
    rows = plan_rows(lm, requests, args.algs.split(","), batches, args.hparams, args.overrides, args.value_dtype, args.max_gpu_memory)
    print(f"{args.model_name} in {args.dtype}, values in {args.value_dtype}: util/memory.py's estimate, not a measurement\n")
    print(plan_table(rows, args.max_gpu_memory))
    return 0


def device_main(args) -> int:
    """The device report (experiments/benchmarking/device.py) for --device / --model_name."""
    caches = Environment.read().caches
    lm = load_model(args.model_name, args.dtype, args.device, model_cache=caches.models)
    batches = [int(b) for b in args.batches.split(",")]
    records = load_cases("cf", args.data_dir, limit=max(batches))
    valued = [alg for alg in args.algs.split(",") if ALGORITHMS[alg].solver is not None]  # editors that optimise values
    if valued:
        hparams = load_algorithm_hparams(valued[0], args.hparams, args.overrides)
        print(replay_path(lm, records[0].request, hparams, args.value_dtype, args.value_compile))
    ctx_args = {"caches": caches, "corpus_path": str(Path(args.data_dir) / "wiki"), "value_dtype": args.value_dtype, "value_compile": args.value_compile,
                "key_chunk_size": args.key_chunk_size, "value_chunk_size": args.value_chunk_size, "max_gpu_memory": args.max_gpu_memory,
                "replay": ReplayRuntime()}
    failed = device_report(lm, records, args.algs.split(","), batches, args.hparams, args.overrides, ctx_args["corpus_path"],
                           args.stats_windows, args.dtype, ctx_args, args.trace_memory)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
