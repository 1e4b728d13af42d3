"""A run's summary, computed from its files alone (so a continued run summarises like a fresh one),
and the table rows that summary.md and experiments/summarize.py print.

Columns follow the papers' tables: ES/PS/NS/S right after each edit ("current", averaged over all
edits) and over all facts at the end ("retained"), downstream probes and perplexity before the
first edit vs at the last evaluation, and the number of disabling edits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from experiments.checkpoint import atomic_write_json, atomic_write_text, read_jsonl
from experiments.eval_counterfact import SECTIONS, CaseResult, PromptScore, summarize

SCORES = ("ES", "PS", "NS", "S")


def case_result(row: dict[str, Any]) -> CaseResult:
    """A CaseResult back from its cases.jsonl line."""
    sections = (tuple(PromptScore(**score) for score in row[section]) for section in SECTIONS)
    return CaseResult(row["case_id"], *sections)


def first_last(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any] | None:
    if not rows:
        return None
    return {end: {"n_edits": row["n_edits"], **{k: row.get(k) for k in keys}} for end, row in (("first", rows[0]), ("last", rows[-1]))}


def of_kind(rows: list[dict[str, Any]], kind: str, task: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == kind and (task is None or r.get("task") == task)]


def build_summary(path: Path, status: str) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    edits = read_jsonl(path / "edits.jsonl")
    rows = read_jsonl(path / "probes.jsonl")
    current_rows = [row for row in read_jsonl(path / "cases.jsonl") if row["phase"] == "current"]
    retention = of_kind(rows, "retention")
    tasks = dict.fromkeys(r["task"] for r in of_kind(rows, "probe"))
    seconds = {"edit": sum(e["seconds"]["edit"] for e in edits), "evaluate": sum(e["seconds"]["evaluate"] for e in edits)}
    seconds["periodic"] = sum(r["seconds"] for r in rows)
    total = sum(seconds.values())
    n_edits = edits[-1]["n_edits"] if edits else 0
    disabling = [{"batch": e["batch"], "n_edits": e["n_edits"], "case_ids": e["case_ids"], "reasons": e["disabling"]}
                 for e in edits if e["disabling"]]
    return {
        "run": path.name, "alg_name": config["alg_name"], "model": config["model"], "mode": config["mode"],
        "batch_size": config["batch_size"], "layers": config["hparams"]["layers"], "seed": config["seed"],
        "git_commit": config["git_commit"],
        "status": status, "n_edits": n_edits, "n_cases": config["n_cases"],
        "n_skipped": len(config.get("skipped_cases", {}).get("case_ids", [])),  # records asking for no change
        "current": summarize([case_result(r) for r in current_rows]),
        "retained": {k: v for k, v in retention[-1].items() if k not in ("kind", "seconds")} if retention else None,
        "probes": {t: first_last(of_kind(rows, "probe", t), ("accuracy", "macro_f1", "mcc")) for t in tasks},
        "perplexity": first_last(of_kind(rows, "perplexity"), ("perplexity",)),
        "generation": first_last(of_kind(rows, "generation"), ("fluency", "consistency")),
        "max_delta_norm": max((e["health"]["delta_norm"] for e in edits), default=None),
        "final_drift_norm": edits[-1]["health"]["drift_norm"] if edits else None,
        "disabling": disabling, "n_disabling": len(disabling),
        "seconds": seconds, "edits_per_second": n_edits / seconds["edit"] if seconds["edit"] else None,
        "seconds_per_edit_all_in": total / n_edits if n_edits else None,
    }


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def change(pair: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    if not pair:
        return "-"
    return f"{fmt(pair['first'][key], digits)} → {fmt(pair['last'][key], digits)}"


def layer_text(layers: list[int] | None) -> str:
    if not layers:
        return "-"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def table_row(summary: dict[str, Any], tasks: Sequence[str]) -> dict[str, str]:
    """One Markdown row; probe cells read "before → after" (accuracy)."""
    current, retained = summary["current"] or {}, summary["retained"] or {}
    row = {key: fmt(summary[key]) for key in ("alg_name", "model", "mode", "batch_size", "n_edits")}
    row["layers"] = layer_text(summary.get("layers"))
    row.update({f"{k} cur": fmt(current.get(k)) for k in SCORES})
    row.update({f"{k} ret": fmt(retained.get(k)) for k in SCORES})
    row.update({f"{t} acc": change(summary["probes"].get(t), "accuracy") for t in tasks})
    row["ppl"] = change(summary["perplexity"], "perplexity", 2)
    row["disabling"] = str(summary["n_disabling"])
    row["status"] = summary["status"]
    row["run"] = summary["run"]
    return row


def csv_row(summary: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The same quantities as numbers, first and last in separate columns."""
    current, retained = summary["current"] or {}, summary["retained"] or {}
    row: dict[str, Any] = {key: summary[key] for key in ("run", "alg_name", "model", "mode", "batch_size", "n_edits", "status")}
    row["layers"] = layer_text(summary.get("layers"))
    row["seed"] = summary.get("seed")
    row.update({f"{k}_current": current.get(k) for k in SCORES})
    row.update({f"{k}_retained": retained.get(k) for k in SCORES})
    for task in tasks:
        pair = summary["probes"].get(task)
        for metric in ("accuracy", "macro_f1", "mcc"):
            for end in ("first", "last"):
                row[f"{task}_{metric}_{end}"] = pair[end][metric] if pair else None
    for end in ("first", "last"):
        row[f"perplexity_{end}"] = summary["perplexity"][end]["perplexity"] if summary["perplexity"] else None
    row["n_disabling"] = summary["n_disabling"]
    return row


def all_tasks(summaries: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for s in summaries for t in s["probes"]))


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    tasks = all_tasks(summaries)
    rows = [table_row(s, tasks) for s in summaries]
    if not rows:
        return "(no runs)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_probe_accuracy(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(n_edits, accuracy averaged over the probe tasks) at each evaluation step."""
    by_step: dict[int, list[float]] = {}
    for r in of_kind(rows, "probe"):
        if r["accuracy"] is not None:
            by_step.setdefault(r["n_edits"], []).append(r["accuracy"])
    return sorted((n, sum(v) / len(v)) for n, v in by_step.items())


def curve_rows(path: Path) -> list[dict[str, Any]]:
    """A run's course, one row per evaluation step: scores over all facts edited so far,
    perplexity, mean probe accuracy, ||W - W0||, disabling edits so far and editing minutes."""
    edits, rows = read_jsonl(path / "edits.jsonl"), read_jsonl(path / "probes.jsonl")
    retained = {r["n_edits"]: r for r in of_kind(rows, "retention")}
    perplexity = {r["n_edits"]: r["perplexity"] for r in of_kind(rows, "perplexity")}
    probes = dict(mean_probe_accuracy(rows))
    curve = []
    for n in sorted(set(retained) | set(perplexity) | set(probes)):
        done = [e for e in edits if e["n_edits"] <= n]
        curve.append({"edits": n, **{k: retained.get(n, {}).get(k) for k in SCORES}, "ppl": perplexity.get(n),
                      "probe acc": probes.get(n), "||W - W0||": done[-1]["health"]["drift_norm"] if done else 0.0,
                      "disabling": sum(bool(e["disabling"]) for e in done),
                      "edit min": sum(e["seconds"]["edit"] for e in done) / 60})
    return curve


def curve_markdown(runs: dict[str, Path]) -> str:
    """The courses of several runs (label -> run folder) in one table."""
    lines = ["| run | edits | ES ret | PS ret | NS ret | S ret | ppl | probe acc | \\|W - W0\\| | disabling | edit min |",
             "|" + "---|" * 11]
    for label, path in runs.items():
        for row in curve_rows(path):
            cells = [label, str(row["edits"]), *(fmt(row[k]) for k in SCORES), fmt(row["ppl"], 2), fmt(row["probe acc"]),
                     fmt(row["||W - W0||"], 1), str(row["disabling"]), fmt(row["edit min"], 1)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['alg_name']} on {summary['model']}: {summary['mode']}, {summary['n_edits']} edits ({summary['status']})", "",
             markdown_table([summary])]
    if summary["probes"]:
        lines += ["Probes (before the first edit → last evaluation):", "", "| task | accuracy | macro F1 | MCC |", "|---|---|---|---|"]
    for task, pair in summary["probes"].items():
        lines.append(f"| {task} | {change(pair, 'accuracy')} | {change(pair, 'macro_f1')} | {change(pair, 'mcc')} |")
    gen = summary["generation"]
    lines += ["", f"Perplexity: {change(summary['perplexity'], 'perplexity', 2)}; generation fluency: {change(gen, 'fluency')}, "
              f"consistency: {change(gen, 'consistency')}; max ||Delta||: {fmt(summary['max_delta_norm'])}, "
              f"final ||W - W0||: {fmt(summary['final_drift_norm'])}", "", f"Disabling edits: {summary['n_disabling']}"]
    lines += [f"- after {d['n_edits']} edits (cases {d['case_ids']}): {'; '.join(d['reasons'])}" for d in summary["disabling"]]
    if summary.get("n_skipped"):
        lines += ["", f"Records skipped because target_new equals target_true: {summary['n_skipped']}"]
    sec = summary["seconds"]
    lines += ["", f"Time: editing {sec['edit']:.0f} s, per-edit evaluation {sec['evaluate']:.0f} s, periodic evaluation "
              f"{sec['periodic']:.0f} s; git {summary['git_commit'][:12]}, seed {summary['seed']}", ""]
    return "\n".join(lines)


def write_summary(path: Path, status: str) -> dict[str, Any]:
    summary = build_summary(path, status)
    atomic_write_json(path / "summary.json", summary)
    atomic_write_text(path / "summary.md", summary_markdown(summary))
    return summary
