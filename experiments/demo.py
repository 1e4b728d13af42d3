"""The demo `make demo` runs: r-ROME edits the hand-written facts of data/demo_edits.yaml into the
embedded model, one at a time, and measures before the first edit, every 10 edits and at the end;
then it prints the run's table.

    python experiments/demo.py [--data_dir ../shared/data --corpus ../shared/data/wiki] [--continue_from_run results/R-ROME/run_NNN]

Other evaluate.py flags are passed on. It says up front roughly how long it takes; every phase
shows a progress bar; Ctrl-C or SIGTERM stops it cleanly (the edit in progress is rolled back and
checkpointed), prints the table of the edits done and says how to continue (`make demo
CONTINUE=results/R-ROME/run_NNN`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from data.cases import load_cases
from experiments.evaluate import options_from_argv
from experiments.pipeline.checkpoint import RUN_NAME
from experiments.pipeline.run import run
from experiments.reporting.summary import build_summary, markdown_table
from util.cli import run_cli
from util.paths import PROJECT_ROOT

DEMO_EDITS = PROJECT_ROOT / "data" / "demo_edits.yaml"
EVAL_EVERY = 10
FLAGS = ["--alg_name", "R-ROME", "--ds_name", "custom", "--custom_path", str(DEMO_EDITS), "--dataset_size_limit", "1000",
         "--sequential", "--downstream_eval_steps", str(EVAL_EVERY), "--number_of_tests", "20"]

# Measured on this project's 2-core CPU (README: "Running an evaluation", "Choosing the edited layer"):
# an r-ROME edit of the embedded model ~15 s plus ~1 s to score it; an evaluation round with four
# probes of 50 items, perplexity and generation 45 s (the demo's one probe of 20 items: about half);
# the first run's key statistics of one layer over 102,400 tokens ~35 s per edit more over 10 edits.
SECONDS_PER_EDIT, SECONDS_PER_ROUND, FIRST_TIME_SECONDS = 16, 25, 6 * 60


def estimate(n_edits: int) -> str:
    rounds = 1 + math.ceil(n_edits / EVAL_EVERY)  # before the first edit, every EVAL_EVERY edits and at the end
    minutes = (n_edits * SECONDS_PER_EDIT + rounds * SECONDS_PER_ROUND) / 60
    return (f"roughly {minutes:.0f} minutes on a 2-core CPU (~{SECONDS_PER_EDIT} s per edit, ~{SECONDS_PER_ROUND} s for each "
            f"of {rounds} evaluation rounds), plus ~{FIRST_TIME_SECONDS // 60} minutes the first time for the key statistics "
            f"(and ~20 s to unpack the model), both cached afterwards; this machine has {os.cpu_count()} cores (more are "
            f"faster, a busy machine is slower)")


def run_folders(root: Path) -> set[Path]:
    return {p for p in root.glob("*") if RUN_NAME.match(p.name)} if root.is_dir() else set()


def table(path: Path) -> str:
    """The run's table row from its summary.json (written when a session ends), else from its streams."""
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = build_summary(path, "interrupted")
    return markdown_table([summary])


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    options = options_from_argv(FLAGS + extra)
    n_edits = min(len(load_cases("custom", custom_path=DEMO_EDITS)), options.dataset_size_limit)
    what = "continues" if options.continue_from_run else "runs"
    print(f"demo: {what} r-ROME on the embedded SmolLM2-135M, editing {n_edits} hand-written facts one at a time and "
          f"measuring before the first edit, every {EVAL_EVERY} edits and at the end: {estimate(n_edits)}. "
          f"Ctrl-C stops it cleanly and says how to continue.", file=sys.stderr, flush=True)
    root = Path(options.results_dir) / options.alg_name
    before = run_folders(root)
    try:
        path = run(options)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (util.cli.Terminated): the run has rolled back and checkpointed
        new = sorted(run_folders(root) - before)
        path = Path(options.continue_from_run) if options.continue_from_run else (new[-1] if new else None)
        if path is None or not (path / "config.json").is_file():
            print("demo interrupted before its run began: nothing to continue; `make demo` starts again "
                  "(the model and statistics computed so far stay cached)", file=sys.stderr)
        else:
            print(f"demo interrupted; the edits done so far:\n{table(path)}continue it with: make demo CONTINUE={path}  "
                  f"(or: python experiments/evaluate.py --continue_from_run {path})", file=sys.stderr)
        raise
    print(table(path), end="")
    print(f"results: {path} (summary.md, plots); every run so far: python experiments/summarize.py {root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
