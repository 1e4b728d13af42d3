"""A run's summary, computed from its files alone (so a continued run summarises like a fresh one),
and the table rows that summary.md and experiments/summarize.py print.

Columns follow the papers' tables: ES/PS/NS/S right after each edit ("current", averaged over all
edits) and over all facts at the end ("retained"), downstream probes and perplexity before the
first edit vs at the last evaluation, and the number of disabling edits. Every block of numbers
carries the protocol that defined it ("protocol", experiments/metrics/protocols.py), and "paper" holds
AlphaEdit's Table 1 columns under the run's protocol.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from experiments.metrics.counterfact import SECTIONS, CaseResult, PromptScore, retention_summary, summarize
from experiments.metrics.protocols import COLUMNS, Protocol, paper_columns, protocol
from util.files import atomic_write_json, atomic_write_text, read_jsonl
from util.paths import CHECKPOINT_FOLDER, CHECKPOINT_STATE

SCORES = ("ES", "PS", "NS", "S")
PROBE_METRICS = ("accuracy", "macro_f1", "weighted_f1", "mcc")


def case_result(row: dict[str, Any]) -> CaseResult:
    """A CaseResult back from its cases.jsonl line."""
    sections = (tuple(PromptScore(**score) for score in row[section]) for section in SECTIONS)
    return CaseResult(row["case_id"], *sections)


def first_last(rows: list[dict[str, Any]], keys: Sequence[str], name: str) -> dict[str, Any] | None:
    """The first row and the last one measured later ("last": None while there is none: a run
    evaluated only before its first edit has no "after", not the same number twice)."""
    if not rows:
        return None
    later = rows[-1] if rows[-1]["n_edits"] > rows[0]["n_edits"] else None
    ends = {end: {"n_edits": row["n_edits"], **{k: row.get(k) for k in keys}} if row else None
            for end, row in (("first", rows[0]), ("last", later))}
    return {"protocol": name, **ends}


def run_setup(options: dict[str, Any]) -> dict[str, Any]:
    """What a run measured with (its probe and generation options), for the texts that describe it."""
    keys = ("downstream_tasks", "number_of_tests", "number_of_few_shots", "generation_test_interval", "generation_tokens")
    return {key: options.get(key) for key in keys}


def setup_text(setup: dict[str, Any] | None, spec: Protocol) -> str:
    """"probes sst2, mrpc (20 items each, 3-shot); generation of 40 new tokens every 10 edits": what a
    run measured with (run_setup) under protocol `spec` (whose choices override some options)."""
    if not setup:
        return "its probe and generation settings were not recorded"
    tasks = setup.get("downstream_tasks") or []
    shots = setup.get("number_of_few_shots") if spec.few_shot else 0
    probes = f"probes {', '.join(tasks)} ({setup.get('number_of_tests')} items each, {shots}-shot)" if tasks else "no probes"
    every = setup.get("generation_test_interval")
    length = (f"up to {spec.generation_length} tokens in all" if spec.generation_length
              else f"{setup.get('generation_tokens')} new tokens")
    return f"{probes}; {f'generation of {length} every {every} edits' if every else 'no generation tests'}"


def run_protocol(config: dict[str, Any]) -> str:
    """The protocol of a run (runs from before protocols were named used kedit's)."""
    return config.get("options", {}).get("protocol", "kedit")


def of_kind(rows: list[dict[str, Any]], kind: str, task: str | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == kind and (task is None or r.get("task") == task)]


def checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The run state in the run folder's committed checkpoint (status, sessions, ...); None where
    there is none or it cannot be read (a first session killed before its first checkpoint)."""
    try:
        state = json.loads((path / CHECKPOINT_FOLDER / CHECKPOINT_STATE).read_text(encoding="utf-8"))["state"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def run_parts(path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The sessions (parts) the run's committed checkpoint records: the edit count each began at,
    its device and the commit of its code. The first part's code is the config's; sessions from
    before commits were recorded per session name none (None)."""
    sessions = (checkpoint_state(path) or {}).get("sessions", [])
    parts = [{"at_edits": s["at_edits"], "device": s.get("device"), "git_commit": s.get("git_commit")} for s in sessions]
    if parts and parts[0]["git_commit"] is None:
        parts[0]["git_commit"] = config["git_commit"]
    return parts


def code_text(summary: dict[str, Any]) -> str:
    """The commits of the code that produced a run, part by part ("a+b": parts on two commits; "?":
    a part whose commit was not recorded); the config's commit for summaries without parts."""
    commits = [(part["git_commit"] or "?")[:7] for part in summary.get("parts") or []] or [(summary.get("git_commit") or "-")[:7]]
    return "+".join(c for i, c in enumerate(commits) if i == 0 or c != commits[i - 1])


def unestimated(row: dict[str, Any]) -> bool:
    """A retention row over a sample, written before retention_summary's stratified estimate: its
    scores are plain means over the sample and the latest batch."""
    return row["kind"] == "retention" and row.get("scope") == "sample" and "estimate" not in row


def run_rows(path: Path) -> list[dict[str, Any]]:
    """A run's probes.jsonl rows, those `unestimated` given retention_summary's estimate from the
    per-fact scores in cases.jsonl (where the folder has them; a record in the docs holds the
    rows as its report showed them)."""
    rows = read_jsonl(path / "probes.jsonl")
    if not any(unestimated(r) for r in rows) or not (path / "cases.jsonl").exists():
        return rows
    per_fact: dict[int, list[dict[str, Any]]] = {}
    for fact in read_jsonl(path / "cases.jsonl"):
        if fact["phase"] == "retention":
            per_fact.setdefault(fact["n_edits"], []).append(fact)
    latest = {e["n_edits"]: e["case_ids"] for e in read_jsonl(path / "edits.jsonl")}
    out = []
    for row in rows:
        facts = per_fact.get(row["n_edits"], [])
        if unestimated(row) and row["n_edits"] in latest and len(facts) == row["n_cases"]:
            row = {**row, **retention_summary([f["metrics"] for f in facts], [f["case_id"] for f in facts],
                                              latest[row["n_edits"]], row["facts_in_model"])}
        out.append(row)
    return out


def current_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, with what it drew from the retention rows ("retained" and the paper
    columns) drawn again where run_rows estimates rows it summarised as plain means."""
    summary = json.loads((path / "summary.json").read_text())
    rows = read_jsonl(path / "probes.jsonl")
    if any(unestimated(r) for r in rows) and (path / "cases.jsonl").exists():
        rebuilt = build_summary(path, summary["status"])
        return {**summary, "retained": rebuilt["retained"], "paper": rebuilt["paper"]}
    return summary


def build_summary(path: Path, status: str) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    edits = read_jsonl(path / "edits.jsonl")
    rows = run_rows(path)
    current_rows = [row for row in read_jsonl(path / "cases.jsonl") if row["phase"] == "current"]
    retention = of_kind(rows, "retention")
    tasks = dict.fromkeys(r["task"] for r in of_kind(rows, "probe"))
    seconds = {"edit": sum(e["seconds"]["edit"] for e in edits), "evaluate": sum(e["seconds"]["evaluate"] for e in edits)}
    seconds["periodic"] = sum(r["seconds"] for r in rows)
    total = sum(seconds.values())
    n_edits = edits[-1]["n_edits"] if edits else 0
    name = run_protocol(config)
    generation = of_kind(rows, "generation")
    final_drift = edits[-1]["health"]["drift_norm"] if edits else None
    ppl = of_kind(rows, "perplexity")
    periodic = retention + of_kind(rows, "probe") + ppl
    disabling = [{"batch": e["batch"], "n_edits": e["n_edits"], "case_ids": e["case_ids"], "reasons": e["disabling"]}
                 for e in edits if e["disabling"]]
    return {
        "run": path.name, "alg_name": config["alg_name"], "model": config["model"], "mode": config["mode"],
        "batch_size": config["batch_size"], "layers": config["hparams"].get("layers"), "seed": config["seed"],
        "git_commit": config["git_commit"], "parts": run_parts(path, config),
        "status": status, "n_edits": n_edits, "n_cases": config["n_cases"], "protocol": name,
        "setup": run_setup(config.get("options", {})),
        "evaluated_at": max((r["n_edits"] for r in periodic), default=None),  # the last evaluation's edit count
        "n_skipped": len(config.get("skipped_cases", {}).get("case_ids", [])),  # records asking for no change
        "current": {"protocol": name, **summarize([case_result(r) for r in current_rows])},
        "retained": {"protocol": name, **{k: v for k, v in retention[-1].items() if k not in ("kind", "seconds")}} if retention else None,
        "probes": {t: first_last(of_kind(rows, "probe", t), (*PROBE_METRICS, "invalid"), name) for t in tasks},
        "dataset": config.get("dataset"),
        "known": first_last(of_kind(rows, "known"), ("accuracy", "nll", "n_items", "chance"), name),
        "retention": config.get("retention") and {k: v for k, v in config["retention"].items() if k != "case_ids"},
        "perplexity": first_last(ppl, ("perplexity",), name),
        "generation": first_last(generation, ("fluency", "consistency", "scope", "facts"), name),
        "paper": {"protocol": name, "n_edits": n_edits,
                  **paper_columns(name, retention[-1] if retention else None, generation[-1] if generation else None),
                  "perplexity": ppl[-1]["perplexity"] if ppl and (ppl[-1]["n_edits"] or not n_edits) else None,
                  "||W - W0||": final_drift},
        "max_delta_norm": max((e["health"]["delta_norm"] for e in edits), default=None),
        "final_drift_norm": final_drift,
        "disabling": disabling, "n_disabling": len(disabling),
        "collapse": perplexity_collapse(ppl, config.get("options", {}).get("stop_on_perplexity") or COLLAPSE_RATIO),
        "seconds": seconds, "edits_per_second": n_edits / seconds["edit"] if seconds["edit"] else None,
        "evaluation_share": (seconds["evaluate"] + seconds["periodic"]) / total if total else None,
        "seconds_per_edit_all_in": total / n_edits if n_edits else None,
        # requests whose target value was read from the value cache (--value_cache), not optimised
        "values_from_cache": sum(bool(r.get("v_cached")) for e in edits for r in e.get("requests") or []),
    }


COLLAPSE_RATIO = 10.0  # the collapse rule reported when a run set no --stop_on_perplexity


def perplexity_collapse(rows: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
    """The first evaluation whose perplexity reached `ratio` x the pre-edit one (n_edits None: none did)."""
    first = rows[0]["perplexity"] if rows and rows[0]["n_edits"] == 0 else None
    at = next((r["n_edits"] for r in rows if first and r["perplexity"] >= ratio * first), None)
    return {"rule": f"perplexity >= {ratio:g} x pre-edit", "n_edits": at}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def change(pair: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    if not pair:
        return "-"
    last = pair["last"]
    return f"{fmt(pair['first'].get(key), digits)} → {fmt(last.get(key), digits) if last else '-'}"


def layer_text(layers: list[int] | None) -> str:
    if not layers:
        return "-"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def table_row(summary: dict[str, Any], tasks: Sequence[str]) -> dict[str, str]:
    """One Markdown row; probe cells read "before → after" in the protocol's probe score
    (kedit: "acc", accuracy; alphaedit: "f1", weighted F1)."""
    current, retained = summary["current"] or {}, summary["retained"] or {}
    spec = protocol(summary.get("protocol", "kedit"))
    row = {key: fmt(summary[key]) for key in ("alg_name", "model", "mode", "batch_size", "n_edits")}
    row["layers"] = layer_text(summary.get("layers"))
    row.update({f"{k} cur": fmt(current.get(k)) for k in SCORES})
    row.update({f"{k} ret": fmt(retained.get(k)) for k in SCORES})
    row.update({f"{t} {spec.probe_label}": change(summary["probes"].get(t), spec.probe_score) for t in tasks})
    row["known"] = change(summary.get("known"), "accuracy")
    row["ppl"] = change(summary["perplexity"], "perplexity", 2)
    row["disabling"] = str(summary["n_disabling"])
    row["protocol"] = spec.name
    row["status"] = summary["status"]
    row["run"] = summary["run"]
    row["commit"] = code_text(summary)  # the code that produced the row, part by part
    return row


def csv_row(summary: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The same quantities as numbers, first and last in separate columns."""
    current, retained = summary["current"] or {}, summary["retained"] or {}
    row: dict[str, Any] = {key: summary[key] for key in ("run", "alg_name", "model", "mode", "batch_size", "n_edits", "status")}
    row["layers"] = layer_text(summary.get("layers"))
    row["seed"] = summary.get("seed")
    row["protocol"] = summary.get("protocol", "kedit")  # defines every number of the row
    row.update({f"{k}_current": current.get(k) for k in SCORES})
    row.update({f"{k}_retained": retained.get(k) for k in SCORES})
    for task in tasks:
        pair = summary["probes"].get(task)
        for metric in PROBE_METRICS:
            for end in ("first", "last"):
                row[f"{task}_{metric}_{end}"] = pair[end].get(metric) if pair and pair[end] else None
    known = summary.get("known")
    for end in ("first", "last"):
        row[f"known_{end}"] = known[end]["accuracy"] if known and known[end] else None
    for end in ("first", "last"):
        ppl = summary["perplexity"]
        row[f"perplexity_{end}"] = ppl[end]["perplexity"] if ppl and ppl[end] else None
    paper = summary.get("paper") or {}
    row.update({column: paper.get(column) for column in COLUMNS})
    row["final_drift_norm"] = summary.get("final_drift_norm")
    row["n_disabling"] = summary["n_disabling"]
    return row


def all_tasks(summaries: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for s in summaries for t in s["probes"]))


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    tasks = all_tasks(summaries)
    rows = [table_row(s, tasks) for s in summaries]
    if not rows:
        return "(no runs)\n"
    header = list(dict.fromkeys(h for row in rows for h in row))  # runs of two protocols: both probe columns
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.get(h, "-") for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def paper_markdown(summaries: dict[str, dict[str, Any]]) -> str:
    """AlphaEdit's Table 1 columns plus perplexity and ||W - W0||, one row per run (label ->
    summary), each number under the protocol named in its row."""
    lines = ["| run | protocol | edits | " + " | ".join(COLUMNS) + " | ppl | \\|W - W0\\| |", "|" + "---|" * (len(COLUMNS) + 5)]
    for label, summary in summaries.items():
        paper = summary.get("paper") or {}
        cells = [label, paper.get("protocol", "-"), fmt(paper.get("n_edits")), *(fmt(paper.get(c), 2) for c in COLUMNS),
                 fmt(paper.get("perplexity"), 2), fmt(paper.get("||W - W0||"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_curve(path: Path) -> list[dict[str, Any]]:
    """A run's paper columns at each evaluation step (retention, generation and perplexity rows of
    that step; ||W - W0|| after it), under the run's protocol."""
    name = run_protocol(json.loads((path / "config.json").read_text()))
    edits, rows = read_jsonl(path / "edits.jsonl"), run_rows(path)
    by_step = {kind: {r["n_edits"]: r for r in of_kind(rows, kind)} for kind in ("retention", "generation", "perplexity")}
    curve = []
    for n in sorted(set().union(*by_step.values())):
        done = [e for e in edits if e["n_edits"] <= n]
        curve.append({"edits": n, **paper_columns(name, by_step["retention"].get(n), by_step["generation"].get(n)),
                      "perplexity": by_step["perplexity"].get(n, {}).get("perplexity"),
                      "||W - W0||": done[-1]["health"]["drift_norm"] if done else 0.0})
    return curve


def mean_probe_accuracy(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(n_edits, accuracy averaged over the probe tasks) at each evaluation step."""
    by_step: dict[int, list[float]] = {}
    for r in of_kind(rows, "probe"):
        if r["accuracy"] is not None:
            by_step.setdefault(r["n_edits"], []).append(r["accuracy"])
    return sorted((n, sum(v) / len(v)) for n, v in by_step.items())


def curve_rows(path: Path) -> list[dict[str, Any]]:
    """A run's course, one row per evaluation step: retention scores over the edited facts (run_rows),
    perplexity, mean probe accuracy, ||W - W0||, disabling edits so far and editing minutes."""
    edits, rows = read_jsonl(path / "edits.jsonl"), run_rows(path)
    retained = {r["n_edits"]: r for r in of_kind(rows, "retention")}
    perplexity = {r["n_edits"]: r["perplexity"] for r in of_kind(rows, "perplexity")}
    known = {r["n_edits"]: r["accuracy"] for r in of_kind(rows, "known")}
    probes = dict(mean_probe_accuracy(rows))
    curve = []
    for n in sorted(set(retained) | set(perplexity) | set(probes) | set(known)):
        done = [e for e in edits if e["n_edits"] <= n]
        curve.append({"edits": n, **{k: retained.get(n, {}).get(k) for k in SCORES},
                      "scored": retained.get(n, {}).get("n_cases"), "ppl": perplexity.get(n), "known": known.get(n),
                      "probe acc": probes.get(n), "||W - W0||": done[-1]["health"]["drift_norm"] if done else 0.0,
                      "disabling": sum(bool(e["disabling"]) for e in done),
                      "edit min": sum(e["seconds"]["edit"] for e in done) / 60})
    return curve


def below_half(curve: list[dict[str, Any]], key: str) -> int | None:
    """The first evaluation (edits) after an edit where `key` fell below half its starting value:
    the unedited model's where it was measured (the known-facts probe), else the first value after
    editing (retention has none before). None: never, or never measured. Starting from the unedited
    model keeps the answer independent of --downstream_eval_steps: a run evaluated every 500 edits
    that is already below half at its first point says 500, not "never"."""
    measured = [row for row in curve if row.get(key) is not None]
    if not any(row["edits"] > 0 for row in measured):
        return None
    start = measured[0][key]
    return next((row["edits"] for row in measured if row["edits"] > 0 and row[key] < start / 2), None)


def milestones(path: Path) -> dict[str, Any]:
    """Where a run crossed the lines the studies report: its first disabling edit, collapse (the
    perplexity rule of its summary), retention S and the known-facts probe below half their starting
    value (below_half), and the share of its wall time spent evaluating."""
    summary = current_summary(path)
    curve = curve_rows(path)
    return {"edits": summary["n_edits"], "status": summary["status"],
            "first disabling": summary["disabling"][0]["n_edits"] if summary["disabling"] else None,
            "collapse": (summary.get("collapse") or {}).get("n_edits"), "collapse rule": (summary.get("collapse") or {}).get("rule"),
            "S below half": below_half(curve, "S"), "known below half": below_half(curve, "known"),
            "evaluation share": summary.get("evaluation_share"),
            "edits/hour": 3600 * summary["n_edits"] / sum(summary["seconds"].values()) if sum(summary["seconds"].values()) else None}


def milestones_markdown(runs: dict[str, Path]) -> str:
    """milestones() of several runs (label -> run folder) in one table ("-": not reached)."""
    lines = ["| run | edits | status | first disabling edit | collapse | S below half | known below half | "
             "evaluation share | edits/hour |", "|" + "---|" * 9]
    for label, path in runs.items():
        m = milestones(path)
        rule = f" ({m['collapse rule']})" if m["collapse"] is not None else ""
        cells = [label, str(m["edits"]), m["status"], fmt(m["first disabling"]), fmt(m["collapse"]) + rule, fmt(m["S below half"]),
                 fmt(m["known below half"]), fmt(m["evaluation share"], 2), fmt(m["edits/hour"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_markdown(runs: dict[str, Path]) -> str:
    """The courses of several runs (label -> run folder) in one table."""
    lines = ["| run | edits | ES ret | PS ret | NS ret | S ret | facts scored | known | ppl | probe acc | \\|W - W0\\| | disabling | edit min |",
             "|" + "---|" * 13]
    for label, path in runs.items():
        for row in curve_rows(path):
            cells = [label, str(row["edits"]), *(fmt(row[k]) for k in SCORES), fmt(row["scored"]), fmt(row["known"]),
                     fmt(row["ppl"], 2), fmt(row["probe acc"]), fmt(row["||W - W0||"], 1), str(row["disabling"]), fmt(row["edit min"], 1)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[str, Any]) -> str:
    spec = protocol(summary.get("protocol", "kedit"))
    lines = [f"# {summary['alg_name']} on {summary['model']}: {summary['mode']}, {summary['n_edits']} edits ({summary['status']})", "",
             f"Protocol `{spec.name}` (every number below): {spec.description}. This run: {setup_text(summary.get('setup'), spec)}.", ""]
    evaluated = summary.get("evaluated_at")
    if evaluated is not None and evaluated < summary["n_edits"]:
        lines += [f"Retention, probes and perplexity were last measured after {evaluated} of these {summary['n_edits']} edits"
                  f"{' (before the first edit: nothing measured after editing yet, shown as -)' if evaluated == 0 else ''}.", ""]
    lines += [markdown_table([summary]),
             "AlphaEdit's Table 1 columns under this protocol (after the last edit, over every edited fact):", "",
             paper_markdown({summary["run"]: summary}), *(f"- {name}: {text}" for name, text in spec.definitions.items()), ""]
    if summary["probes"]:
        lines += ["Probes (before the first edit → last evaluation):", "", "| task | accuracy | macro F1 | weighted F1 | MCC |",
                  "|---|---|---|---|---|"]
    for task, pair in summary["probes"].items():
        cells = " | ".join(change(pair, metric) for metric in PROBE_METRICS)
        lines.append(f"| {task} | {cells} |")
    if summary.get("dataset"):
        lines += ["", f"Dataset `{summary['dataset']['name']}`: {summary['dataset']['measures']}."]
    retention = summary.get("retention") or {}
    retained = summary.get("retained") or {}
    if retention.get("scope") == "sample":
        lines += ["", f"Retention (\"ret\" columns): a seeded sample of {retention['sample_size']} of the run's facts, each "
                  f"scored at every evaluation once edited, plus the latest batch"
                  f"{'; the last evaluation scores every edited fact' if retention.get('all_at_end') else ''}; "
                  f"last evaluation: {fmt(retained.get('n_cases'))} of {fmt(retained.get('facts_in_model'))} facts in the model"
                  f"{', the scores estimated over all of them' if retained.get('estimate') == 'stratified' else ''}."]
    known = summary.get("known")
    if known:
        lines += ["", f"Known facts (the unedited model completes them; none about an edited subject): "
                  f"{change(known, 'accuracy')} of {known['first']['n_items']} still completed; chance {known['first']['chance']:.1e}."]
    gen = summary["generation"]
    lines += ["", f"Perplexity: {change(summary['perplexity'], 'perplexity', 2)}; generation fluency: {change(gen, 'fluency')}, "
              f"consistency: {change(gen, 'consistency')}; max ||Delta||: {fmt(summary['max_delta_norm'])}, "
              f"final ||W - W0||: {fmt(summary['final_drift_norm'])}", "", f"Disabling edits: {summary['n_disabling']}"]
    lines += [f"- after {d['n_edits']} edits (cases {d['case_ids']}): {'; '.join(d['reasons'])}" for d in summary["disabling"]]
    collapse = summary.get("collapse")
    if collapse:
        at = collapse["n_edits"]
        lines += ["", f"Collapse ({collapse['rule']}): {'at the evaluation after ' + str(at) + ' edits' if at is not None else 'not reached'}"]
    if summary.get("n_skipped"):
        lines += ["", f"Records skipped because target_new equals target_true: {summary['n_skipped']}"]
    if summary.get("values_from_cache"):
        lines += ["", f"Target values read from the value cache (--value_cache, optimised before on the same weights): "
                      f"{summary['values_from_cache']} of {summary['n_edits']} requests"]
    sec = summary["seconds"]
    lines += ["", f"Time: editing {sec['edit']:.0f} s, per-edit evaluation {sec['evaluate']:.0f} s, periodic evaluation "
              f"{sec['periodic']:.0f} s; git {summary['git_commit'][:12]}, seed {summary['seed']}"]
    if len(summary.get("parts") or []) > 1:
        lines += ["", "Parts (sessions): " + "; ".join(
            f"from {part['at_edits']} edits on {part['device']}, code {(part['git_commit'] or 'not recorded')[:12]}"
            for part in summary["parts"])]
    return "\n".join(lines + [""])


def write_summary(path: Path, status: str) -> dict[str, Any]:
    summary = build_summary(path, status)
    atomic_write_json(path / "summary.json", summary)
    atomic_write_text(path / "summary.md", summary_markdown(summary))
    return summary
