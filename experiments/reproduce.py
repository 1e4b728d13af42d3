"""Reproduce the three findings behind this project on the embedded model, on CPU:

  a  rome     sequential original ROME vs r-ROME over the same edits: disabling edits, ||W - W0||
              growth, perplexity and probe curves
  b  forget   sequential MEMIT and EMMET (batch 1) over the same edits: gradual, then catastrophic
              forgetting; retention of earlier edits
  c  batch    equal total edits as one batch vs sequential batches of a quarter and a sixteenth of
              it (EMMET, MEMIT; --edits 256 gives 64 and 16): neighbourhood score and probes, as in
              the Llama-3 batch-size study
  lifelong    AlphaEdit and ENCORE, sequential, shown next to the MEMIT and EMMET runs of "forget"
  alphaedit   AlphaEdit's Table 1: 2,000 CounterFact edits in sequential batches of 100 with MEMIT,
              PRUNE, RECT, AlphaEdit, EMMET and ENCORE, scored under --protocol alphaedit; adds the
              table in the paper's columns (+ perplexity, ||W - W0||) and a plot of each column
              against the number of edits (results_alphaedit_columns.png)

    python experiments/reproduce.py --study rome --edits 200 --jobs 2 \\
        --data_dir ../shared/data --corpus ../shared/data/wiki

Each run is a normal evaluate.py run folder under <results_dir>/reproduce/<study>/<label>/; the
study's table (Markdown) and comparison plot are written to <docs_dir>/results_<study>.{md,png}.
Arguments after "--" go to every run (e.g. -- --number_of_tests 100). A long study runs in parts:
`-- --stop_after 500` pauses every run after 500 more edits, `-- --continue_from_run run_001`
continues each (every label's first run is its run_001).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments.reporting.plots import write_comparison, write_paper_columns
from experiments.reporting.summary import curve_markdown, markdown_table, paper_markdown
from experiments.summarize import find_summaries, load_summaries
from experiments.sweep import EVALUATE, run_local
from util.cli import run_cli
from util.errors import KeditError

@dataclass(frozen=True)
class Study:
    title: str
    runs: list[tuple[str, list[str]]]  # (label, evaluate.py flags); "{edits}" etc. are filled in
    edits: int = 200  # default --edits
    eval_every: int = 25  # default --eval_every
    paper_table: bool = False  # also AlphaEdit's Table 1 columns and a plot of each against the number of edits


# AlphaEdit's repository's editors (MEMIT, PRUNE, RECT, AlphaEdit) and this project's EMMET and ENCORE.
ALPHAEDIT_EDITORS = ("MEMIT", "PRUNE", "RECT", "AlphaEdit", "EMMET", "ENCORE")

STUDIES = {
    "rome": Study("original ROME vs r-ROME, sequential", [("ROME", ["--alg_name", "ROME", "--sequential"]),
                                                          ("R-ROME", ["--alg_name", "R-ROME", "--sequential"])]),
    "forget": Study("MEMIT and EMMET, sequential, batch 1", [("MEMIT", ["--alg_name", "MEMIT", "--sequential"]),
                                                            ("EMMET", ["--alg_name", "EMMET", "--sequential"])]),
    "batch": Study("one batch vs sequential batches of a quarter and a sixteenth (equal total edits)", [
        (f"{alg}_{name}", ["--alg_name", alg, *flags])
        for alg in ("EMMET", "MEMIT")
        for name, flags in (("one-batch", ["--num_edits", "{edits}"]),
                            ("seq-batch-{quarter}", ["--sequential", "--num_edits", "{quarter}"]),
                            ("seq-batch-{sixteenth}", ["--sequential", "--num_edits", "{sixteenth}"]))]),
    "lifelong": Study("AlphaEdit and ENCORE next to MEMIT and EMMET, sequential, batch 1", [
        (alg, ["--alg_name", alg, "--sequential"]) for alg in ("AlphaEdit", "ENCORE", "FT-L", "FT-M", "UltraEdit")]),
    # AlphaEdit's Table 1 on CounterFact: 2,000 edits in sequential batches of 100, scored under its protocol.
    "alphaedit": Study("AlphaEdit's Table 1 protocol: CounterFact, sequential batches of 100", [
        (alg, ["--alg_name", alg, "--sequential", "--num_edits", "100", "--ds_name", "cf", "--protocol", "alphaedit"])
        for alg in ALPHAEDIT_EDITORS], edits=2000, eval_every=500, paper_table=True),
}
# Runs a study shows but does not repeat: the same edits, probes and seed already run by another study.
REUSED = {"lifelong": [("forget", "MEMIT"), ("forget", "EMMET")]}


def _fill(text: str, args: argparse.Namespace) -> str:
    return text.format(edits=args.edits, quarter=max(1, args.edits // 4), sixteenth=max(1, args.edits // 16))


def for_study(study: str, args: argparse.Namespace) -> argparse.Namespace:
    """args with the study's own defaults where --edits / --eval_every were not given."""
    spec = STUDIES[study]
    return argparse.Namespace(**{**vars(args), "edits": args.edits or spec.edits, "eval_every": args.eval_every or spec.eval_every})


def commands(study: str, args: argparse.Namespace, extra: list[str]) -> list[tuple[str, list[str]]]:
    args = for_study(study, args)
    root = Path(args.results_dir) / "reproduce" / study
    common = ["--dataset_size_limit", str(args.edits), "--downstream_eval_steps", str(args.eval_every),
              "--generation_test_interval", str(args.eval_every), "--seed", str(args.seed), "--value_dtype", args.value_dtype]
    for flag, value in (("--data_dir", args.data_dir), ("--corpus", args.corpus)):
        if value:
            common += [flag, value]
    algs = args.algs.split(",") if args.algs else None
    return [(_fill(label, args), [sys.executable, EVALUATE, *[_fill(f, args) for f in flags], *common,
                                  "--results_dir", str(root / _fill(label, args)), *extra])
            for label, flags in STUDIES[study].runs if algs is None or flags[1] in algs]


def report(study: str, args: argparse.Namespace) -> None:
    args, spec = for_study(study, args), STUDIES[study]
    base = Path(args.results_dir) / "reproduce"
    labels = [(source, label) for source, label in REUSED.get(study, [])]
    labels += [(study, _fill(label, args)) for label, _ in spec.runs]
    runs = {label: sorted((base / source / label).rglob("summary.json"))[-1].parent
            for source, label in labels if list((base / source / label).rglob("summary.json"))}
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    summaries = load_summaries(find_summaries([str(p) for p in runs.values()]))
    table = markdown_table(summaries)
    course = curve_markdown(runs)
    paper = ""
    if spec.paper_table:
        paper = (f"AlphaEdit's Table 1 columns (each under the protocol in its row), perplexity and ||W - W0|| after the "
                 f"last edit; their course is plotted in results_{study}_columns.png:\n\n"
                 f"{paper_markdown(dict(zip(runs, summaries)))}\n")
        write_paper_columns(runs, docs / f"results_{study}_columns.png", spec.title)
    (docs / f"results_{study}.md").write_text(f"### {spec.title}\n\n{paper}{table}\nCourse of each run "
                                              f"(scores over all facts edited so far):\n\n{course}")
    write_comparison(runs, docs / f"results_{study}.png", spec.title)
    print(paper + table, end="")
    print(f"wrote {docs / f'results_{study}.md'} and {docs / f'results_{study}.png'}")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="all", help=f"{', '.join(STUDIES)} or all")
    parser.add_argument("--edits", type=int, default=None,
                        help="facts edited per run (total per run for 'batch'); default 200, alphaedit 2000")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="retention, probes, perplexity, generation every K edits; default 25, alphaedit 500")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (cores are shared out)")
    parser.add_argument("--value_dtype", default="bfloat16", help="bfloat16 keeps each study near 30 min on CPU; float32 is exact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algs", default=None, help="only the runs of these algorithms (comma-separated), e.g. EMMET")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--docs_dir", default="docs")
    parser.add_argument("--report_only", action="store_true", help="only redraw tables and plots from existing runs")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.study != "all" and args.study not in STUDIES:
        raise KeditError(f"--study {args.study!r}: choose from {', '.join(STUDIES)} or all")
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    failed = 0
    for study in studies:
        if not args.report_only:
            codes = run_local(commands(study, args, extra), Path(args.results_dir) / "reproduce" / study, args.jobs)
            failed += sum(code != 0 for code in codes)
        report(study, args)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
