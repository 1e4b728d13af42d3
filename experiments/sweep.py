"""Run a grid of evaluate.py runs (algorithms x layers x batch sizes x seeds), each point a normal
run folder, locally in parallel processes or on a Slurm cluster through submitit; then merge the
grid into one table with experiments/summarize.py.

    python experiments/sweep.py --name layers --alg_name R-ROME --layers 2,4,6,8 \\
        --num_edits 1 --seeds 0 --jobs 2 -- --dataset_size_limit 10 --downstream_tasks none
    python experiments/sweep.py --name batch --alg_name EMMET,MEMIT --num_edits 16,64,256 \\
        --slurm gpu --slurm_gpus 1 -- --sequential --dataset_size_limit 256 --model_name gpt2-xl \\
        --hparams_fname gpt2-xl.yaml

Arguments after "--" go to every run unchanged. --layers entries are single layers (4) or ranges
(2-6, for MEMIT-style editors), separated by commas; each becomes `--set layers=[...]`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from util.cli import run_cli
from util.errors import KeditError
from util.paths import PROJECT_ROOT

EVALUATE = str(PROJECT_ROOT / "experiments" / "evaluate.py")


@dataclass(frozen=True)
class Point:
    alg_name: str
    layers: list[int] | None
    num_edits: int
    seed: int

    def label(self) -> str:
        layers = "" if self.layers is None else f"_L{self.layers[0]}-{self.layers[-1]}"
        return f"{self.alg_name}{layers}_B{self.num_edits}_s{self.seed}"

    def command(self, results_dir: Path, extra: list[str]) -> list[str]:
        cmd = [sys.executable, EVALUATE, "--alg_name", self.alg_name, "--num_edits", str(self.num_edits),
               "--seed", str(self.seed), "--results_dir", str(results_dir / self.label())]
        if self.layers is not None:
            cmd += ["--set", f"layers={self.layers}"]
        return cmd + extra


def parse_layer_spec(text: str) -> list[int]:
    try:
        if "-" in text:
            start, stop = (int(x) for x in text.split("-"))
            return list(range(start, stop + 1))
        return [int(text)]
    except ValueError:
        raise KeditError(f"--layers entry '{text}': expected a layer (4) or a range (2-6)") from None


def ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise KeditError(f"{flag} '{text}': expected comma-separated integers") from None


def grid(args: argparse.Namespace) -> list[Point]:
    layers = [parse_layer_spec(x) for x in args.layers.split(",")] if args.layers else [None]
    return [Point(a, l, b, s) for a, l, b, s in itertools.product(
        args.alg_name.split(","), layers, ints(args.num_edits, "--num_edits"), ints(args.seeds, "--seeds"))]


def run_local(jobs_list: list[tuple[str, list[str]]], results_dir: Path, jobs: int) -> list[int]:
    """Run (label, command) pairs, `jobs` processes at a time, each appending its log to
    <results_dir>/<label>/sweep.log. The cores are shared out so that processes do not
    oversubscribe them (OpenMP threads spinning against each other slow torch down badly)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def launch(item: tuple[str, list[str]]) -> int:
        label, command = item
        folder = results_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "sweep.log", "a") as log:  # appended: a run done in parts keeps every part's log
            log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {shlex.join(command)}\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{'done' if code == 0 else f'FAILED ({code})'}: {label}  (log: {folder / 'sweep.log'})", flush=True)
        return code

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(launch, jobs_list))


def run_slurm(points: list[Point], results_dir: Path, extra: list[str], args: argparse.Namespace) -> list[int]:
    import submitit  # only needed on a cluster

    executor = submitit.AutoExecutor(folder=str(results_dir / "slurm"))
    executor.update_parameters(slurm_partition=args.slurm, gpus_per_node=args.slurm_gpus,
                               timeout_min=args.slurm_minutes, cpus_per_task=args.slurm_cpus)
    jobs = [executor.submit(submitit.helpers.CommandFunction(p.command(results_dir, extra), cwd=str(PROJECT_ROOT))) for p in points]
    print(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs)}; waiting", flush=True)
    codes = []
    for point, job in zip(points, jobs):
        try:
            job.result()
            codes.append(0)
        except Exception as err:  # a failed point must not hide the others
            print(f"FAILED: {point.label()}: {str(err).splitlines()[0] if str(err) else err!r}")
            codes.append(1)
    return codes


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the sweep's folder: <results_dir>/sweeps/<name>/")
    parser.add_argument("--alg_name", default="R-ROME", help="comma-separated")
    parser.add_argument("--layers", default=None, help="comma-separated layers or ranges (default: the hparams' own)")
    parser.add_argument("--num_edits", default="1", help="comma-separated batch sizes")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--jobs", type=int, default=1, help="local processes at once")
    parser.add_argument("--slurm", default=None, metavar="PARTITION", help="submit to Slurm instead of running locally")
    parser.add_argument("--slurm_gpus", type=int, default=1)
    parser.add_argument("--slurm_cpus", type=int, default=8)
    parser.add_argument("--slurm_minutes", type=int, default=24 * 60)
    args = parser.parse_args(own)
    if args.jobs < 1:
        raise KeditError("--jobs must be at least 1")
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    points = grid(args)
    results_dir = Path(args.results_dir) / "sweeps" / args.name
    print(f"{len(points)} runs into {results_dir}", flush=True)
    if args.slurm:
        codes = run_slurm(points, results_dir, extra, args)
    else:
        codes = run_local([(p.label(), p.command(results_dir, extra)) for p in points], results_dir, args.jobs)
    from experiments.summarize import find_summaries, load_summaries
    from experiments.reporting.summary import markdown_table

    summaries = load_summaries(find_summaries([str(results_dir)]))
    print(markdown_table(summaries), end="")
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    run_cli(main)
