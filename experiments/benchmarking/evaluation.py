"""Benchmark the batched evaluation against the straightforward path (one forward per prompt and
target, full logits) on the embedded model: seconds per CounterFact record and per probe item.

    python -m experiments.benchmarking.evaluation --data_dir ../shared/data --records 20 --probe_items 30

(experiments/benchmark.py runs the same comparison as its `eval` phase.)
"""
from __future__ import annotations

import argparse
import time

import torch

from data.cases import load_cases
from data.probes import load_probe
from experiments.metrics.counterfact import evaluate_cases
from experiments.metrics.probes import build_prompts, evaluate_probe
from util.cli import run_cli
from util.environment import Environment
from util.models import LoadedModel, load_model
from util.tokens import encode_with_target


@torch.inference_mode()
def naive_logprobs(lm: LoadedModel, prompt: str, target: str) -> list[float]:
    """Target token log-probs after the prompt: one unpadded forward, log-softmax over all logits."""
    ids, start = encode_with_target(lm.tok, prompt, target)
    logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]


def naive_nll(lm: LoadedModel, prompt: str, target: str) -> float:
    values = naive_logprobs(lm, prompt, target)
    return -sum(values) / len(values)


def naive_counterfact(lm: LoadedModel, records) -> list[float]:
    """Every NLL the CounterFact evaluation needs, one forward each."""
    out = []
    for record in records:
        request = record.request
        for prompt in (request.text, *record.paraphrase_prompts):
            out += [naive_nll(lm, prompt, request.target_new), naive_nll(lm, prompt, request.target_true)]
        for prompt, answer in record.neighborhood:
            out += [naive_nll(lm, prompt, request.target_new), naive_nll(lm, prompt, answer)]
    return out


def batched_nlls(results) -> list[float]:
    out = []
    for result in results:
        for score in (*result.rewrite, *result.paraphrase):
            out += [score.nll_new, score.nll_true]
        for score in result.neighborhood:
            out += [score.nll_new, score.nll_true]
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def bench_counterfact(lm: LoadedModel, data_dir: str, n: int) -> dict:
    """Seconds per record, batched and one forward per prompt, and the largest NLL difference."""
    records = load_cases("cf", data_dir=data_dir, limit=n)
    evaluate_cases(lm, records[:2])  # warm-up
    results, fast = timed(evaluate_cases, lm, records)
    naive, slow = timed(naive_counterfact, lm, records)
    diff = max(abs(a - b) for a, b in zip(batched_nlls(results), naive))
    return {"records": n, "pairs": len(naive), "fast": fast / n, "slow": slow / n, "max_dnll": diff}


def bench_probe(lm: LoadedModel, data_dir: str, task: str, n: int, shots: int) -> dict:
    """Seconds per probe item, batched and one forward per (prompt, label), and label agreement."""
    probe = load_probe(task, data_dir=data_dir, limit=n, seed=0)
    result, fast = timed(evaluate_probe, lm, probe, n_shots=shots)
    prompts, _ = build_prompts(probe, shots, seed=0)

    def naive() -> list[int]:
        words = probe.label_words
        return [max(range(len(words)), key=lambda k: sum(naive_logprobs(lm, p, words[k]))) for p in prompts]

    predictions, slow = timed(naive)
    agree = sum(a == b for a, b in zip(predictions, result.predictions)) / len(predictions)
    return {"task": task, "items": n, "shots": shots, "accuracy": result.accuracy, "fast": fast / n, "slow": slow / n, "agree": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--probe_items", type=int, default=30)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mmlu"])
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model_name, model_cache=Environment.read().caches.models)
    print(f"model {args.model_name}, torch threads {torch.get_num_threads()}")
    cf = bench_counterfact(lm, args.data_dir, args.records)
    print(f"counterfact: {cf['records']} records, {cf['pairs']} prompt/target pairs")
    print(f"  batched     {cf['fast']:.3f} s/record")
    print(f"  one-by-one  {cf['slow']:.3f} s/record   ratio {cf['slow'] / cf['fast']:.1f}x   max |dNLL| {cf['max_dnll']:.1e}")
    for task in args.tasks:
        pr = bench_probe(lm, args.data_dir, task, args.probe_items, args.shots)
        print(f"probe {task}: {pr['items']} items, {pr['shots']} shots, accuracy {pr['accuracy']:.3f}")
        print(f"  batched     {pr['fast']:.3f} s/item")
        print(f"  one-by-one  {pr['slow']:.3f} s/item   ratio {pr['slow'] / pr['fast']:.1f}x   same labels {pr['agree']:.0%}")
    return 0


if __name__ == "__main__":
    run_cli(main)
