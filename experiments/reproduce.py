"""Reproduce the findings behind this project on the embedded model, on CPU:

  a  rome       sequential original ROME vs r-ROME over the same 1,000 CounterFact edits, each run
                ended early once the model has collapsed (perplexity 10x the unedited model's):
                disabling edits, ||W - W0|| growth, perplexity, known facts, retention
  b  batch      the batch-size study ("Is bigger edit batch size always better?"): the same 4,096
                flat CounterFact edits with EMMET and MEMIT, batched (independent batches) and
                sequential-batched at 16, 64, 256, 1,024 and 4,096 edits per batch, evaluated every
                1,024 edits (a sequential-batched run at 4,096 is the batched one); the batched runs
                of an editor optimise each fact's target value once (--value_cache: all batch sizes
                edit the unedited model with the same values, so they differ only in the solve),
                in the run at 4,096, which starts first: its values are optimised in chunks of 64
  c  lifelong   MEMIT, EMMET, AlphaEdit, ENCORE, RECT, PRUNE, FT-L, FT-M and UltraEdit over 10,000 flat
                CounterFact edits in sequential batches of 100, evaluated every 500
  d  alphaedit  AlphaEdit's Table 1: 2,000 CounterFact edits (cf_flat: the original-schema records,
                then flat records of other facts) in sequential batches of 100 with MEMIT,
                PRUNE, RECT, AlphaEdit, EMMET and ENCORE, scored under --protocol alphaedit (Fluency and
                Consistency at the end over a seeded sample of 100 edited facts' prompts); adds the
                table in the paper's columns (+ perplexity, ||W - W0||) and a plot of each column
                against the number of edits (results_alphaedit_columns.png)
     forget     sequential MEMIT and EMMET (batch 1) over the same edits: gradual, then catastrophic
                forgetting; retention of earlier edits (an earlier, shorter study)

The letters are those of docs/results.md's long studies.

    python experiments/reproduce.py --study rome --jobs 2 --data_dir ../shared/data --corpus ../shared/data/wiki

Each run is a normal evaluate.py run folder under <results_dir>/reproduce/<study>/<label>/; the
study's table (Markdown) and comparison plot are written to <docs_dir>/results_<study>.{md,png},
and the part of each run folder they were drawn from (its config, summary, edit and probe
records: no per-fact scores, no checkpoint) to <docs_dir>/runs/<study>/<label>/, so a report is
redrawn from those records where a run folder is absent (a clone, a lost results folder) or
behind its record.
Arguments after "--" go to every run (e.g. -- --number_of_tests 100). A long study runs in parts:
`--part 500` runs each of the study's runs for at most 500 more edits: it continues the label's
first run (its run_001) from its checkpoint where it exists, starts it where not, and leaves runs
that ended (complete, or collapsed under --stop_on_perplexity); the same command, repeated, runs
a long study to its end part by part (by hand: `-- --stop_after 500`, then
`-- --continue_from_run run_001 --stop_after 500`). `--runs LABEL,...` picks some of a study's
runs. Retention is scored on a seeded sample of each run's facts (evaluate.py --retention_sample),
so an evaluation point costs the same at 100 and at 10,000 edits.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.reporting.plots import write_batch_sizes, write_comparison, write_paper_columns
from experiments.reporting.summary import (checkpoint_state, current_summary, curve_markdown, markdown_table, milestones_markdown,
                                          paper_markdown, run_rows, summary_markdown)
from experiments.summarize import find_summaries, load_summaries
from experiments.sweep import EVALUATE, run_local
from util.cli import run_cli
from util.errors import KeditError
from util.files import atomic_write_json, atomic_write_text, jsonable
from util.paths import CHECKPOINT_FOLDER, CHECKPOINT_STATE
from util.stats import fast_bfloat16

@dataclass(frozen=True)
class Study:
    title: str
    runs: list[tuple[str, list[str]]]  # (label, evaluate.py flags); "{edits}" etc. are filled in
    edits: int = 200  # default --edits
    eval_every: int = 25  # default --eval_every
    paper_table: bool = False  # also AlphaEdit's Table 1 columns and a plot of each against the number of edits
    report_order: tuple[str, ...] = ()  # the rows' order in the report where it is not the order runs start in


# AlphaEdit's repository's editors (MEMIT, PRUNE, RECT, AlphaEdit) and this project's EMMET and ENCORE.
ALPHAEDIT_EDITORS = ("MEMIT", "PRUNE", "RECT", "AlphaEdit", "EMMET", "ENCORE")
LIFELONG_EDITORS = ("MEMIT", "EMMET", "AlphaEdit", "ENCORE", "RECT", "PRUNE", "FT-L", "FT-M", "UltraEdit")
BATCH_SIZES = (16, 64, 256, 1024, 4096)  # seed 002's batch sizes; 4,096 edits in all
RECORDS = "runs"  # <docs_dir>/runs/<study>/<label>/: each reported run's record (keep_record)
# What a report reads from a run folder: everything but the per-fact scores (cases.jsonl, several MB
# in a long run) and the checkpoint (edited weights; tens of MB).
RECORD_FILES = ("config.json", "summary.json", "summary.md", "edits.jsonl", "probes.jsonl")
FLAT = ["--ds_name", "flat_cf_train"]  # 10,000 records: enough for the long studies
ALPHAEDIT_GENERATION_SAMPLE = 100  # study d's facts generated from at the end (evaluate.py --final_generation_sample)

def batch_runs(largest_batched_first: bool) -> list[tuple[str, list[str]]]:
    """The batch study's runs. In this order two jobs at once are two editors' runs (which share no
    values), and each editor's batched runs after its first read the values that one optimised;
    started largest first, that is the batch of 4,096, whose values are optimised in chunks of 64
    (compute_v's chunk_size), the cheapest per request on a CPU (README, Speed): a run at 16 first
    would pay batch 16's cost for every value. The report lists them from 16 up."""
    batched = BATCH_SIZES[::-1] if largest_batched_first else BATCH_SIZES
    return [(f"{alg}_{mode}_{size}", ["--alg_name", alg, "--num_edits", str(size), *flags, *FLAT, "--value_cache"])
            for mode, flags, sizes in (("batched", [], batched), ("seq-batched", ["--sequential"], BATCH_SIZES))
            for size in sizes for alg in ("EMMET", "MEMIT")
            if not (mode == "seq-batched" and size == 4096)]


STUDIES = {
    "rome": Study("original ROME vs r-ROME, sequential, until collapse (perplexity 10x the unedited model's)", [
        (alg, ["--alg_name", alg, "--sequential", "--stop_on_perplexity", "10"]) for alg in ("ROME", "R-ROME")],
        edits=1000, eval_every=50),
    "forget": Study("MEMIT and EMMET, sequential, batch 1", [("MEMIT", ["--alg_name", "MEMIT", "--sequential"]),
                                                            ("EMMET", ["--alg_name", "EMMET", "--sequential"])]),
    "batch": Study("the same 4,096 edits batched and sequential-batched at 16 to 4,096 edits per batch",
                   batch_runs(largest_batched_first=True), edits=4096, eval_every=1024,
                   report_order=tuple(label for label, _ in batch_runs(largest_batched_first=False))),
    "lifelong": Study("lifelong editing: sequential batches of 100 over 10,000 flat CounterFact edits", [
        (alg, ["--alg_name", alg, "--sequential", "--num_edits", "100", *FLAT]) for alg in LIFELONG_EDITORS],
        edits=10000, eval_every=500),
    # AlphaEdit's Table 1 on CounterFact: 2,000 edits in sequential batches of 100, scored under its protocol;
    # cf_flat: the original-schema records (generation prompts), then flat records of other facts up to 2,000.
    # Fluency and Consistency at the end over a seeded sample of 100 of the edited facts' prompts (1,000
    # continuations of 100 tokens, ~15 min on one CPU core), not all 1,225 facts' (12,250: ~3 h).
    "alphaedit": Study("AlphaEdit's Table 1 protocol: CounterFact, sequential batches of 100", [
        (alg, ["--alg_name", alg, "--sequential", "--num_edits", "100", "--ds_name", "cf_flat", "--protocol", "alphaedit",
               "--final_generation_sample", str(ALPHAEDIT_GENERATION_SAMPLE)])
        for alg in ALPHAEDIT_EDITORS], edits=2000, eval_every=500, paper_table=True),
}
# Runs a study shows but does not repeat: the same edits, probes and seed already run by another study.
REUSED: dict[str, list[tuple[str, str]]] = {}


def _fill(text: str, args: argparse.Namespace) -> str:
    return text.format(edits=args.edits)


def chosen(study: str, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The study's runs that --algs and --runs pick (all by default)."""
    algs = args.algs.split(",") if args.algs else None
    labels = args.runs.split(",") if args.runs else None
    runs = [(label, flags) for label, flags in STUDIES[study].runs
            if (algs is None or flags[1] in algs) and (labels is None or label in labels)]
    if labels and not runs:
        raise KeditError(f"--runs {args.runs}: study {study} has runs {', '.join(label for label, _ in STUDIES[study].runs)}")
    return runs


def for_study(study: str, args: argparse.Namespace) -> argparse.Namespace:
    """args with the study's own defaults where --edits / --eval_every were not given."""
    spec = STUDIES[study]
    return argparse.Namespace(**{**vars(args), "edits": args.edits or spec.edits, "eval_every": args.eval_every or spec.eval_every})


def first_run_status(folder: Path) -> str | None:
    """The status (paused, interrupted, running, complete, collapsed) in the committed checkpoint of
    a label's first run, `folder` (<label>/<ALG>/run_001); None where the run was never started.
    A folder without a checkpoint cannot be continued: one line naming it."""
    if not folder.exists():
        return None
    state = checkpoint_state(folder)
    if state is None or "status" not in state:
        raise KeditError(f"{folder} has no readable checkpoint ({CHECKPOINT_FOLDER}/{CHECKPOINT_STATE}), so --part cannot "
                         f"continue it: move the folder away to start the run over")
    return state["status"]


def part_flags(label: str, folder: Path, part: int) -> list[str] | None:
    """evaluate.py's flags for the next part of at most `part` edits of a label's run: continue its
    run_001, or start it; None (printed) where that run has ended."""
    status = first_run_status(folder)
    if status in ("complete", "collapsed"):
        print(f"{label}: {folder} is {status}; left as it is", flush=True)
        return None
    return (["--continue_from_run", folder.name] if status else []) + ["--stop_after", str(part)]


def commands(study: str, args: argparse.Namespace, extra: list[str]) -> list[tuple[str, list[str]]]:
    args = for_study(study, args)
    root = Path(args.results_dir) / "reproduce" / study
    common = ["--dataset_size_limit", str(args.edits), "--downstream_eval_steps", str(args.eval_every),
              "--generation_test_interval", str(args.eval_every), "--seed", str(args.seed), "--value_dtype", args.value_dtype]
    for flag, value in (("--data_dir", args.data_dir), ("--corpus", args.corpus)):
        if value:
            common += [flag, value]
    runs = []
    for label, flags in chosen(study, args):
        label, results = _fill(label, args), root / _fill(label, args)
        part = [] if args.part is None else part_flags(label, results / flags[1] / "run_001", args.part)
        if part is not None:
            runs.append((label, [sys.executable, EVALUATE, *[_fill(f, args) for f in flags], *common,
                                 "--results_dir", str(results), *part, *extra]))
    return runs


def n_edits(run: Path) -> int:
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))["n_edits"]


def reported_run(folder: Path | None, record: Path) -> Path | None:
    """What the report shows for one label: its run folder under --results_dir, or its record in
    the docs (RECORDS) where there is no run folder or the record holds more edits (a study
    restarted on another machine does not shrink the report until its new run is further on)."""
    kept = record if (record / "summary.json").exists() else None
    if folder is not None and kept is not None:
        kept_edits, folder_edits = n_edits(kept), n_edits(folder)
        if kept_edits > folder_edits:
            print(f"warning: {record} ({kept_edits} edits) is further on than {folder} ({folder_edits}); "
                  f"the report shows the record", file=sys.stderr)
            return kept
    if folder is None and kept is not None:
        print(f"{record.name}: no run folder; reported from its record {record}", file=sys.stderr)
    return folder or kept


def keep_record(run: Path, record: Path) -> None:
    """Copy what a study's report reads from a run folder (RECORD_FILES) into `record`, beside the
    docs it backs, so the report can be redrawn without the run folder (a clone, another machine,
    a results folder lost)."""
    record.mkdir(parents=True, exist_ok=True)
    # the retention rows and summary as the report shows them (run_rows: estimated from the
    # per-fact scores, which the record does not keep); the other files as they are
    derived = ("probes.jsonl", "summary.json", "summary.md")
    for name in RECORD_FILES:
        if name not in derived and (run / name).exists():
            atomic_write_text(record / name, (run / name).read_text(encoding="utf-8"))
    atomic_write_text(record / "probes.jsonl", "".join(json.dumps(jsonable(row)) + "\n" for row in run_rows(run)))
    summary = current_summary(run)
    atomic_write_json(record / "summary.json", summary)
    atomic_write_text(record / "summary.md", summary_markdown(summary))


def report(study: str, args: argparse.Namespace) -> None:
    args, spec = for_study(study, args), STUDIES[study]
    base = Path(args.results_dir) / "reproduce"
    labels = [(source, label) for source, label in REUSED.get(study, [])]
    order = {label: index for index, label in enumerate(spec.report_order)}
    labels += sorted(((study, _fill(label, args)) for label, _ in spec.runs), key=lambda pair: order.get(pair[1], len(order)))
    docs = Path(args.docs_dir)
    runs = {}
    for source, label in labels:
        found = sorted((base / source / label).rglob("summary.json"))
        run = reported_run(found[-1].parent if found else None, docs / RECORDS / source / label)
        if run is not None:
            runs[label] = run
    if not runs:  # never replace a shipped table and plot with an empty one
        raise KeditError(f"no runs of study '{study}' under {base / study} (no summary.json of "
                         f"{', '.join(label for _, label in labels)}) and no records of them in {docs / RECORDS}: "
                         f"{docs / f'results_{study}.md'} and .png left as they are; check --results_dir, or run the study first")
    missing = [label for _, label in labels if label not in runs]
    if missing:
        print(f"warning: study '{study}': no runs of {', '.join(missing)} under {base}; the table shows the others", file=sys.stderr)
    docs.mkdir(parents=True, exist_ok=True)
    for source, label in labels:
        if label in runs and runs[label] != docs / RECORDS / source / label:
            keep_record(runs[label], docs / RECORDS / source / label)
    summaries = load_summaries(find_summaries([str(p) for p in runs.values()]))
    table = markdown_table(summaries)
    course = curve_markdown(runs)
    paper = ""
    if spec.paper_table:
        paper = (f"AlphaEdit's Table 1 columns (each under the protocol in its row), perplexity and ||W - W0|| after the "
                 f"last edit; their course is plotted in results_{study}_columns.png:\n\n"
                 f"{paper_markdown(dict(zip(runs, summaries)))}\n")
        write_paper_columns(runs, docs / f"results_{study}_columns.png", spec.title)
    marks = milestones_markdown(runs)
    atomic_write_text(docs / f"results_{study}.md", f"### {spec.title}\n\n{paper}{table}\nCourse of each run (retention "
                                                     f"scores over the facts edited so far, estimated from those scored after each evaluation):\n\n{course}\n"
                                                     f"Milestones (\"-\": not reached; \"below half\": of the unedited model's "
                                                     f"score for known facts, of the first evaluation's for S):\n\n{marks}")
    write_comparison(runs, docs / f"results_{study}.png", spec.title)
    if study == "batch":
        write_batch_sizes(summaries, docs / "results_batch_sizes.png", spec.title)
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
    parser.add_argument("--value_dtype", default="auto",
                        help="auto: bfloat16 (mixed precision, several times faster) where the CPU has native bfloat16 "
                             "matmuls (avx512_bf16 or AMX), else float32 (emulated bfloat16 is slower than float32); "
                             "or float32 / bfloat16 (a run continued on another machine: give the dtype it began with)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algs", default=None, help="only the runs of these algorithms (comma-separated), e.g. EMMET")
    parser.add_argument("--runs", default=None, help="only these runs of the study (comma-separated labels), e.g. EMMET_batched_16")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--docs_dir", default="docs")
    parser.add_argument("--report_only", action="store_true", help="only redraw tables and plots from existing runs")
    parser.add_argument("--part", type=int, default=None, metavar="N",
                        help="run the study in parts of at most N edits per run: each run's run_001 is continued where it "
                             "exists and started where not; runs that ended (complete or collapsed) are left as they are")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.study != "all" and args.study not in STUDIES:
        raise KeditError(f"--study {args.study!r}: choose from {', '.join(STUDIES)} or all")
    if args.part is not None and (args.part < 1 or {"--stop_after", "--continue_from_run"} & set(extra)):
        raise KeditError("--part N (N >= 1) continues or starts each run itself: give it without -- --stop_after / --continue_from_run")
    if args.value_dtype == "auto":
        args.value_dtype = "bfloat16" if fast_bfloat16(torch.device("cpu")) else "float32"
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    failed, unreported = 0, []
    for study in studies:
        if not args.report_only:
            runs = commands(study, args, extra)
            if not runs and args.part is not None:
                print(f"study {study}: every chosen run has ended; redrawing its report", flush=True)
            codes = run_local(runs, Path(args.results_dir) / "reproduce" / study, args.jobs)
            failed += sum(code != 0 for code in codes)
        try:
            report(study, args)
        except KeditError as err:  # the other studies are still reported
            unreported.append(str(err))
    if unreported:
        raise KeditError("; ".join(unreported))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
