"""Write a run's edited model as a Hugging Face folder (safetensors, config, tokenizer).

    python experiments/export.py results/AlphaEdit/run_003 [--at N] [--out DIR]

The folder loads with AutoModelForCausalLM.from_pretrained(DIR); what is written and checked is
described in experiments/pipeline/export.py.
"""
from __future__ import annotations

import argparse

from experiments.pipeline.export import export_run
from util.cli import run_cli
from util.environment import Environment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="results/<ALG>/run_NNN")
    parser.add_argument("--at", type=int, default=None, metavar="N", help="the checkpoint after N edits (default: the last)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/model_<edits>)")
    parser.add_argument("--device", default="cpu", help="where to load the base model: cpu, cuda or auto")
    args = parser.parse_args()
    path = export_run(args.run, args.out, args.at, device=args.device, model_cache=Environment.read().caches.models)
    print(f"edited model: {path}  (AutoModelForCausalLM.from_pretrained('{path}'))")
    return 0


if __name__ == "__main__":
    run_cli(main)
