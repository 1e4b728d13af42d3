"""Compute (or load from cache) the key second-moment statistics C0 of one or more layers.

    python experiments/key_stats.py --model_name smollm2-135m --layers 4 --n_samples 200
"""
from __future__ import annotations

import argparse
import time

import torch

from util.cli import run_cli
from util.corpus import resolve_corpus
from util.models import load_model
from util.stats import StatsCache


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--layers", default="4", help="comma-separated layer indices, e.g. 3,4,5")
    parser.add_argument("--corpus", default=None, help="text/JSONL file or folder (else $KEDIT_CORPUS, "
                        "else streamed Wikipedia when online, else text sampled from the model)")
    parser.add_argument("--n_samples", type=int, default=200, help="token windows to read")
    parser.add_argument("--sample_tokens", type=int, default=512, help="tokens per window")
    parser.add_argument("--dtype", default="float32", help="forward dtype (statistics accumulate in float64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model-sampled fallback corpus")
    return parser.parse_args(argv)


def describe(layer: int, mom2: torch.Tensor, count: int) -> str:
    eig = torch.linalg.eigvalsh(mom2)
    asym = (mom2 - mom2.T).abs().max().item() / mom2.abs().max().item()
    return (
        f"layer {layer}: C0 {tuple(mom2.shape)} from {count} keys | trace {mom2.trace().item():.4g} | "
        f"eigenvalues [{eig[0].item():.3g}, {eig[-1].item():.3g}] | condition {eig[-1].item() / max(eig[0].item(), 1e-300):.3g} | "
        f"max asymmetry {asym:.1e} | PSD {bool(eig[0] > -1e-9 * eig[-1])}"
    )


def main() -> int:
    args = parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model(args.model_name, device=args.device)
    corpus = resolve_corpus(args.corpus, lm.model, lm.tok, lm.name, args.n_samples * args.sample_tokens, args.seed)
    cache = StatsCache()
    start = time.perf_counter()
    moments = cache.second_moments(lm, layers, corpus, args.n_samples, args.sample_tokens, args.dtype)
    elapsed = time.perf_counter() - start
    source = f"computed at {cache.last_tokens_per_second:.0f} tokens/s" if cache.last_tokens_per_second else "loaded from cache"
    print(f"model {lm.name} | corpus {corpus.kind} ({corpus.ident}) | {source} in {elapsed:.1f} s")
    for layer, moment in moments.items():
        print(describe(layer, moment.mom2, moment.count))
        print(f"  cache: {cache.path(moment.key)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
