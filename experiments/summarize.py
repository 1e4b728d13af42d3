"""A table over runs, like the papers' tables: one row per results/<ALG>/run_NNN/summary.json.

    python experiments/summarize.py                       # Markdown table of every run under results/
    python experiments/summarize.py results/R-ROME --csv table.csv --markdown table.md
    python experiments/summarize.py results/R-ROME/run_003 results/ROME/run_001

A run without summary.json (its first session still running, or stopped by a crash) and a run
being written now (its folder locked by another process) are shown too, summarised from their
files as they stand, with the status saying so ("running: pid ...", "unfinished").

Columns: algorithm, model, mode, batch size, edits; ES/PS/NS/S right after each edit ("cur",
averaged over edits) and over all facts at the last evaluation ("ret"); probe accuracy and
perplexity before the first edit → at the last evaluation; disabling edits; the protocol that
defined the row's numbers (experiments/metrics/protocols.py); status. The CSV holds the same numbers
unformatted, with accuracy, macro and weighted F1 and MCC first and last, and AlphaEdit's Table 1
columns (Efficacy ... Consistency) under the row's protocol.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.pipeline.checkpoint import RUN_NAME
from experiments.pipeline.runlock import holder
from experiments.reporting.summary import all_tasks, build_summary, csv_row, current_summary, markdown_table
from util.cli import run_cli
from util.errors import RunError


def find_summaries(paths: Sequence[str]) -> list[Path]:
    """summary.json files in (or under) the given folders or files, in a stable order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            found.append(path)
        elif (path / "summary.json").is_file():
            found.append(path / "summary.json")
        elif path.is_dir():
            found.extend(sorted(path.rglob("summary.json")))
        else:
            raise RunError(f"'{path}' is neither a run folder, a results folder nor a summary.json")
    return found


def find_runs(paths: Sequence[str]) -> list[Path]:
    """Run folders (holding config.json) in or under the given folders, or of the summary.json
    files given, in a stable order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            found.append(path.parent)
        elif (path / "config.json").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("config.json") if RUN_NAME.match(p.parent.name)))
        else:
            raise RunError(f"'{path}' is neither a run folder, a results folder nor a summary.json")
    return found


def run_summary(folder: Path) -> dict[str, Any]:
    """The run's summary.json; for a run being written now (its folder locked by another process) or
    one that has none (a first session running, or killed), a summary of its files as they stand,
    with a note on stderr. Checking the lock takes it for an instant (experiments/pipeline/runlock.py)."""
    held = holder(folder)
    if held is None and (folder / "summary.json").is_file():
        return load_summaries([folder / "summary.json"])[0]
    status = f"running: {held}" if held else "unfinished"
    why = f"is being written ({held})" if held else "has no summary.json (stopped before its session ended: continue it)"
    print(f"note: {folder} {why}; its row is summarised from its files as they stand", file=sys.stderr)
    try:
        return build_summary(folder, status)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"{folder}: cannot be summarised ({type(err).__name__}: {err})") from None


def load_summaries(files: Sequence[Path]) -> list[dict[str, Any]]:
    summaries = []
    for file in files:
        try:
            summaries.append(current_summary(file.parent))
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{file}: cannot read ({err})") from None
    return summaries


def csv_text(summaries: Sequence[dict[str, Any]]) -> str:
    tasks = all_tasks(summaries)
    rows = [csv_row(s, tasks) for s in summaries]
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["results"], help="run folders, results folders or summary.json files")
    parser.add_argument("--csv", default=None, help="also write the table as CSV here")
    parser.add_argument("--markdown", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    summaries = [run_summary(folder) for folder in find_runs(args.paths)]
    if not summaries:
        raise RunError(f"no summary.json under {', '.join(args.paths)}")
    table = markdown_table(summaries)
    sys.stdout.write(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.csv:
        Path(args.csv).write_text(csv_text(summaries))
    return 0


if __name__ == "__main__":
    run_cli(main)
