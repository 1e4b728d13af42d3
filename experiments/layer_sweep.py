"""Edit the same facts at each candidate layer and score them, so the default layer is chosen
from data: each fact is edited alone on the unedited model (weights restored after each) and its
efficacy, paraphrase and neighbourhood scores are measured right after the edit.

    python experiments/layer_sweep.py --alg_name R-ROME --layers 0-29:3 --n_records 10
    python experiments/layer_sweep.py --alg_name MEMIT --model_name /path/to/model --hparams auto

`--hparams auto` sweeps from the model's derived hparams (experiments/derive_hparams.py); without
--layers, about ten layers spread over the model's depth. A multi-layer editor's range keeps its
width and ends at each candidate layer.
"""
from __future__ import annotations

import argparse
import time

from data.cases import load_cases
from editors import algorithm, load_algorithm_hparams, model_hparams_file
from experiments import derive_hparams
from experiments.metrics.counterfact import evaluate_cases, summarize
from rome.editor import EditContext
from util.cli import run_cli
from util.deltas import restore
from util.environment import Environment
from util.errors import HparamsError, KeditError
from util.models import load_model


COLUMNS = ("ES", "PS", "NS", "S", "rewrite_acc", "paraphrase_acc")


def parse_layers(text: str) -> list[int]:
    """'4', '2,4,6' or 'start-stop:step' (inclusive)."""
    try:
        if "-" in text:
            span, _, step = text.partition(":")
            start, stop = (int(x) for x in span.split("-"))
            return list(range(start, stop + 1, int(step or 1)))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise KeditError(f"--layers '{text}': expected e.g. 4, 2,4,6 or 0-29:3") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alg_name", default="R-ROME")
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--hparams_fname", "--hparams", default=None,
                        help="file in hparams/<ALG>/ or a path (default: <model name>.yaml); 'auto' as in evaluate.py")
    parser.add_argument("--layers", default=None, help="e.g. 4, 2,4,6 or 0-29:3 (default: every tenth of the model's depth)")
    parser.add_argument("--n_records", type=int, default=10)
    parser.add_argument("--ds_name", default="cf")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--corpus", default=None, help="statistics corpus (see util/corpus.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def sweep(args: argparse.Namespace) -> list[dict]:
    env = Environment.read()
    hparams_file = derive_hparams.resolve(args.alg_name, args.hparams_fname, args.model_name, env.caches.models) \
        or model_hparams_file(args.model_name)
    lm = load_model(args.model_name, model_cache=env.caches.models)
    records = load_cases(args.ds_name, args.data_dir, limit=args.n_records, env=env)
    ctx = EditContext(env.caches, seed=args.seed, corpus_path=args.corpus or env.corpus, offline=env.offline)
    alg = algorithm(args.alg_name)
    base = load_algorithm_hparams(args.alg_name, hparams_file, args.set)
    if not hasattr(base, "layers"):
        raise HparamsError(f"{args.alg_name}'s hparams name no 'layers' to sweep")
    width, depth = len(base.layers), lm.model.config.num_hidden_layers
    spread = args.layers or f"0-{depth - 1}:{max(1, round(depth / 10))}"
    candidates = [layer for layer in parse_layers(spread) if layer - width + 1 >= 0]
    if getattr(base, "mom2_adjustment", False):  # one statistics pass for every layer the sweep will edit
        needed = sorted({j for layer in candidates for j in range(layer - width + 1, layer + 1)})
        ctx.cache.stats.second_moments(lm, needed, ctx.corpus(lm, base), base.mom2_n_samples, base.mom2_sample_tokens, base.mom2_dtype)
    rows = []
    for layer in candidates:
        layers = list(range(layer - width + 1, layer + 1))  # multi-layer editors end at `layer`
        hparams = load_algorithm_hparams(args.alg_name, hparams_file, [*args.set, f"layers={layers}"])
        start, results = time.perf_counter(), []
        for record in records:
            edit = alg.apply(lm, [record.request], hparams, ctx)
            results.extend(evaluate_cases(lm, [record]))
            restore(lm.model, edit.originals)
        scores = summarize(results)
        rows.append({"layer": layer, **{k: scores[k] for k in COLUMNS},
                     "seconds_per_edit": (time.perf_counter() - start) / len(records)})
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = [f"{row['layer']:>5}"] + [f"{row[k]:.3f}" if row[k] is not None else "  -  " for k in COLUMNS]
    return "| " + " | ".join(cells) + f" | {row['seconds_per_edit']:.1f} |"


def main() -> int:
    args = parse_args()
    print(f"{args.alg_name} on {args.model_name}, {args.n_records} {args.ds_name} records per layer")
    print("| layer | ES | PS | NS | S | efficacy (argmax) | paraphrase (argmax) | s/edit |\n|---|---|---|---|---|---|---|---|")
    sweep(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
