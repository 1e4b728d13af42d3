"""Compute (or load from cache) the key second-moment statistics C0 of one or more layers;
share them as files (util/stats_share.py).

    python experiments/key_stats.py --model_name smollm2-135m       # what R-ROME's shipped hparams edit (layer 3)
    python experiments/key_stats.py --model_name smollm2-135m --alg_name MEMIT   # layers 2-6
    python experiments/key_stats.py --model_name smollm2-135m --layers 2,3,4,5,6 --export stats/smollm2 [--nullspace_threshold 0.02]
    python experiments/key_stats.py --model_name smollm2-135m --import stats/smollm2

--export writes C0 (and with --nullspace_threshold AlphaEdit's null-space basis) as safetensors
with a JSON manifest; --import checks that manifest against --model_name and puts the matrices in
this machine's statistics cache, where runs with the same corpus, token count and dtype find them.
The layers, sample counts and dtype default to those of hparams/<--alg_name>/<model>.yaml, so the
cached statistics are the ones a run with the shipped hparams looks up.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from editors import hparams_path, load_algorithm_hparams
from experiments.pipeline.run_config import RunOptions
from util.cli import run_cli
from util.errors import KeditError
from util.corpus import resolve_corpus
from util.environment import Environment
from util.models import load_model
from util.stats import StatsCache
from util.stats_share import export_stats, import_stats, read_manifest


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--alg_name", default="R-ROME",
                        help="whose hparams (hparams/<ALG>/<model>.yaml) give the defaults of --layers, --n_samples, "
                             "--sample_tokens and --dtype")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices, e.g. 3,4,5 (default: the hparams')")
    parser.add_argument("--corpus", default=None, help="text/JSONL file or folder (else $KEDIT_CORPUS, "
                        "else streamed Wikipedia when online, else text sampled from the model)")
    parser.add_argument("--n_samples", type=int, default=None, help="token windows to read (default: mom2_n_samples)")
    parser.add_argument("--sample_tokens", type=int, default=None, help="tokens per window (default: mom2_sample_tokens)")
    parser.add_argument("--dtype", default=None, help="forward dtype (default: mom2_dtype; statistics accumulate in float64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model-sampled fallback corpus")
    share = parser.add_mutually_exclusive_group()
    share.add_argument("--export", metavar="DIR", help="write the statistics and a manifest to DIR")
    share.add_argument("--import", dest="import_dir", metavar="DIR",
                       help="check DIR's manifest against --model_name and add its statistics to the cache")
    parser.add_argument("--nullspace_threshold", type=float, default=None,
                        help="with --export: also AlphaEdit's null-space basis (eigenvalues of C0 below this)")
    args = parser.parse_args(argv)
    if args.import_dir is None:
        with_hparams_defaults(args)
    return args


FALLBACK = {"n_samples": 200, "sample_tokens": 512, "dtype": "float32"}  # where a model has no shipped hparams


def with_hparams_defaults(args: argparse.Namespace) -> None:
    """Fill the statistics flags not given from hparams/<ALG>/<model>.yaml (mom2_n_samples,
    mom2_sample_tokens, mom2_dtype and the edited layers); layers are required without such a file."""
    file = hparams_path(args.alg_name, RunOptions(model_name=args.model_name).hparams_file)
    hparams = load_algorithm_hparams(args.alg_name, str(file)) if file.is_file() else None
    if args.layers is None:
        if hparams is None:
            raise KeditError(f"--layers not given and {file} does not exist: give the layers to compute, e.g. --layers 3,4")
        args.layers = ",".join(map(str, hparams.layers))
    for flag, key in (("n_samples", "mom2_n_samples"), ("sample_tokens", "mom2_sample_tokens"), ("dtype", "mom2_dtype")):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(hparams, key) if hparams is not None else FALLBACK[flag])


def describe(layer: int, mom2: torch.Tensor, count: int) -> str:
    eig = torch.linalg.eigvalsh(mom2)
    asym = (mom2 - mom2.T).abs().max().item() / mom2.abs().max().item()
    return (
        f"layer {layer}: C0 {tuple(mom2.shape)} from {count} keys | trace {mom2.trace().item():.4g} | "
        f"eigenvalues [{eig[0].item():.3g}, {eig[-1].item():.3g}] | condition {eig[-1].item() / max(eig[0].item(), 1e-300):.3g} | "
        f"max asymmetry {asym:.1e} | PSD {bool(eig[0] > -1e-9 * eig[-1])}"
    )


def import_main(args: argparse.Namespace, env: Environment) -> int:
    lm = load_model(args.model_name, device=args.device, model_cache=env.caches.models)
    cache = StatsCache(env.caches.stats)
    keys = import_stats(lm, args.import_dir, cache)
    manifest = read_manifest(Path(args.import_dir))
    print(f"imported C0 of {len(keys)} layer(s) of {manifest['model']} for {lm.name}: checked against its weights")
    for key in keys:
        print(f"  cache: {cache.path(key)}")
    print(f"runs use them with a corpus whose ident is {manifest['corpus']} ({manifest['corpus_kind']}) and hparams "
          f"mom2_n_samples * mom2_sample_tokens = {manifest['n_tokens']} ({manifest['n_samples']} x {manifest['sample_tokens']}), "
          f"mom2_dtype {manifest['dtype']}")
    return 0


def main() -> int:
    args = parse_args()
    env = Environment.read()
    if args.import_dir:
        return import_main(args, env)
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model(args.model_name, device=args.device, model_cache=env.caches.models)
    corpus = resolve_corpus(args.corpus or env.corpus, lm.model, lm.tok, lm.name, args.n_samples * args.sample_tokens,
                            args.seed, offline=env.offline, caches=env.caches)
    cache = StatsCache(env.caches.stats)
    start = time.perf_counter()
    moments = cache.second_moments(lm, layers, corpus, args.n_samples, args.sample_tokens, args.dtype)
    elapsed = time.perf_counter() - start
    source = f"computed at {cache.last_tokens_per_second:.0f} tokens/s" if cache.last_tokens_per_second else "loaded from cache"
    print(f"model {lm.name} | corpus {corpus.kind} ({corpus.ident}) | {source} in {elapsed:.1f} s")
    for layer, moment in moments.items():
        print(describe(layer, moment.mom2, moment.count))
        print(f"  cache: {cache.path(moment.key)}")
    if args.export:
        out = export_stats(lm, layers, corpus, args.n_samples, args.sample_tokens, args.dtype, args.export, cache,
                           args.nullspace_threshold)
        print(f"exported to {out} (manifest.json, key_stats.safetensors)")
    return 0


if __name__ == "__main__":
    run_cli(main)
