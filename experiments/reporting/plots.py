"""PNG plots of a run folder (matplotlib, Agg backend), drawn from its JSONL files:

    downstream.png  probe accuracy / macro F1 / MCC per task and perplexity vs number of edits
    retention.png   ES/PS/NS/S over the edited facts (all scored, or estimated from the retention sample), and right after each edit
    norms.png       ||Delta|| per batch, ||W - W0|| and ||W|| per edited matrix

Disabling edits are marked by red dotted vertical lines in every panel. A panel with a single
point gets a readable range (not matplotlib's +-0.05 around it with an offset label); a panel with
nothing measured says so; panels for measurements a run does not make (probes with
--downstream_tasks none) are not drawn; ES is drawn above S, PS and NS, each with its own marker, so
that equal scores do not hide it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.reporting.summary import mean_probe_accuracy, run_rows
from util.files import read_jsonl, writing

SCORES = ("ES", "PS", "NS", "S")
# Drawn S first and ES last (on top), each with its own marker: equal scores (often all 1.0) stay visible.
SCORE_STYLE = {"S": dict(marker="D", linestyle="--", linewidth=2.5, alpha=0.5, markerfacecolor="none", zorder=2.1),
               "NS": dict(marker="^", zorder=2.2), "PS": dict(marker="s", zorder=2.3), "ES": dict(marker="o", zorder=2.4)}


def _mark_disabling(ax, disabling: list[int]) -> None:
    for i, n in enumerate(disabling):
        ax.axvline(n, color="red", linestyle=":", linewidth=1, label="disabling edit" if i == 0 else None)


# Perplexity is drawn on a log axis once its values span this factor: a collapse (30 -> 10^5) would
# otherwise flatten the gradual phase before it (30 -> 60 -> 400) onto the axis.
PERPLEXITY_LOG_SPAN = 10


def _perplexity_axis(ax) -> None:
    """Log scale for the perplexity panel `ax` when its plotted values span PERPLEXITY_LOG_SPAN or more."""
    values = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if values and max(values) >= PERPLEXITY_LOG_SPAN * min(values):
        ax.set_yscale("log")


def _finish(fig, ax_list, path: Path, title: str, shared_legend: list | None = None) -> None:
    """Label, lay out and write the figure; `shared_legend`: handles of one legend beside the
    panels instead of one per panel."""
    from matplotlib.ticker import MaxNLocator

    for ax in ax_list:
        ax.set_xlabel("number of edits")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _readable_range(ax)
        if shared_legend is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    if shared_legend is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        fig.legend(handles=shared_legend, loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8)
    tmp = path.with_name(path.stem + ".partial.png")
    with writing(path, "plots are drawn again from the streams whenever a run ends"):
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)


def _readable_range(ax) -> None:
    """Where the data span no range (one point, a flat line), a range around it and plain tick
    labels; an empty panel says that nothing was measured yet."""
    if not ax.has_data():
        ax.text(0.5, 0.5, "nothing measured yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        return
    (x0, y0), (x1, y1) = ax.dataLim.get_points()
    if ax.get_autoscalex_on() and math.isfinite(x0 + x1) and x1 - x0 < 1:  # edit counts are whole numbers
        ax.set_xlim(x0 - 1 if x0 >= 1 else x0 - 0.5, x1 + 1)
    flat = math.isfinite(y0 + y1) and y1 - y0 <= 1e-9 * max(abs(y0), abs(y1), 1e-12)
    if ax.get_autoscaley_on() and ax.get_yscale() == "linear" and flat:
        pad = 0.05 * abs(y0) if y0 else 0.05
        ax.set_ylim(y0 - pad, y1 + pad)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)


def _perplexity_panel(ax, ppl: list[dict[str, Any]], disabling: list[int]) -> None:
    """A run's perplexity rows against the number of edits, its disabling edits marked."""
    if ppl:
        ax.plot([r["n_edits"] for r in ppl], [r["perplexity"] for r in ppl], marker="o", color="black", label="WikiText-2")
    ax.set_ylabel("perplexity")
    _perplexity_axis(ax)
    _mark_disabling(ax, disabling)


def plot_downstream(plt, rows: list[dict[str, Any]], disabling: list[int], path: Path, title: str) -> None:
    probes = [r for r in rows if r["kind"] == "probe"]
    ppl = [r for r in rows if r["kind"] == "perplexity"]
    if not probes:  # no probe tasks (--downstream_tasks none): the perplexity panel alone
        fig, ax = plt.subplots(1, 1, figsize=(6, 4))
        _perplexity_panel(ax, ppl, disabling)
        _finish(fig, [ax], path, title + " (no probe tasks)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, ("accuracy", "macro_f1", "mcc")):
        for task in dict.fromkeys(r["task"] for r in probes):
            points = [(r["n_edits"], r[metric]) for r in probes if r["task"] == task and r[metric] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=task)
        known = [(r["n_edits"], r["accuracy"]) for r in rows if r["kind"] == "known"]
        if metric == "accuracy" and known:
            ax.plot(*zip(*known), marker="s", color="black", label="known facts")
        ax.set_ylabel(metric)
        _mark_disabling(ax, disabling)
    _perplexity_panel(axes.flat[3], ppl, disabling)
    _finish(fig, axes.flat, path, title)


def plot_retention(plt, rows, edits, disabling: list[int], path: Path, title: str) -> None:
    retention = [r for r in rows if r["kind"] == "retention"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, key in enumerate(SCORES):
        style = {"color": f"C{i}", **SCORE_STYLE[key]}
        points = [(r["n_edits"], r[key]) for r in retention if r.get(key) is not None]
        if points:
            axes[0].plot(*zip(*points), label=key, **style)
        points = [(e["n_edits"], e["current"][key]) for e in edits if e["current"].get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), label=key, **{**style, "markersize": 4})
    axes[0].set_ylabel("retention: score over the edited facts")
    axes[1].set_ylabel("score of the batch just edited")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        _mark_disabling(ax, disabling)
    _finish(fig, axes, path, title)


def plot_norms(plt, edits, disabling: list[int], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [e["n_edits"] for e in edits]
    axes[0].plot(x, [e["health"]["delta_norm"] for e in edits], marker=".", label="||Delta|| (batch)")
    axes[0].plot(x, [e["health"]["drift_norm"] for e in edits], marker=".", label="||W - W0|| (all edited)")
    params = [m["param"] for m in edits[0]["health"]["matrices"]] if edits else []
    for i, name in enumerate(params):
        norms = [edits[0]["health"]["matrices"][i]["weight0_norm"]] + [e["health"]["matrices"][i]["weight_norm"] for e in edits]
        axes[1].plot([0, *x], norms, marker=".", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Frobenius norm")
    axes[1].set_ylabel("||W||")
    for ax in axes:
        _mark_disabling(ax, disabling)
    _finish(fig, axes, path, title)


def write_plots(path: Path) -> list[Path]:
    """Draw the run's plots into its folder; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = read_jsonl(path / "edits.jsonl")
    rows = run_rows(path)
    disabling = [e["n_edits"] for e in edits if e["disabling"]]
    title = path.parent.name + " " + path.name
    written = [path / "downstream.png", path / "retention.png", path / "norms.png"]
    try:
        plot_downstream(plt, rows, disabling, written[0], f"{title}: downstream probes and perplexity")
        plot_retention(plt, rows, edits, disabling, written[1], f"{title}: CounterFact scores")
        plot_norms(plt, edits, disabling, written[2], f"{title}: update norms")
    finally:
        plt.close("all")
    return written


def write_comparison(runs: dict[str, Path], out: Path, title: str) -> Path:
    """One figure comparing runs (label -> run folder): efficacy and S, and the neighbourhood
    score, over the edited facts (estimated from those scored for retention); perplexity, the
    known-facts probe, mean probe accuracy and ||W - W0|| against the number of edits; each run's
    disabling edits are marked with crosses on its ||W - W0|| curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Past 6 runs, a legend per panel covers the panels (study b compares 18): one legend beside
    # them, and past 10, colours from a 20-colour map so that no two runs share one.
    many = len(runs) > 6
    fig, grid = plt.subplots(2, 3, figsize=(19 if many else 15, 8))
    axes = grid[:, [0, 1]]  # ES/S, perplexity / probes, drift; the third column: NS and known facts
    colors = [plt.get_cmap("tab20")(i % 20) if len(runs) > 10 else f"C{i}" for i in range(len(runs))]
    try:
        for i, (label, path) in enumerate(runs.items()):
            color = colors[i]
            edits, rows = read_jsonl(path / "edits.jsonl"), run_rows(path)
            retention = [(r["n_edits"], r["S"], r["ES"]) for r in rows if r["kind"] == "retention" and r.get("ES") is not None]
            if retention:
                x, s, es = zip(*retention)
                axes[0, 0].plot(x, [v if v is not None else float("nan") for v in s], color=color, label=f"{label} S", **SCORE_STYLE["S"])
                axes[0, 0].plot(x, es, color=color, label=f"{label} ES", **SCORE_STYLE["ES"])
            ns = [(r["n_edits"], r["NS"]) for r in rows if r["kind"] == "retention" and r.get("NS") is not None]
            if ns:
                grid[0, 2].plot(*zip(*ns), marker="o", color=color, label=label)
            known = [(r["n_edits"], r["accuracy"]) for r in rows if r["kind"] == "known"]
            if known:
                grid[1, 2].plot(*zip(*known), marker="o", color=color, label=label)
            ppl = [(r["n_edits"], r["perplexity"]) for r in rows if r["kind"] == "perplexity"]
            if ppl:
                axes[0, 1].plot(*zip(*ppl), marker="o", color=color, label=label)
            acc = mean_probe_accuracy(rows)
            if acc:
                axes[1, 0].plot(*zip(*acc), marker="o", color=color, label=label)
            drift = [(e["n_edits"], e["health"]["drift_norm"]) for e in edits]
            if drift:
                axes[1, 1].plot(*zip(*drift), color=color, label=label)
            marks = [(e["n_edits"], e["health"]["drift_norm"]) for e in edits if e["disabling"]]
            if marks:
                axes[1, 1].plot(*zip(*marks), "x", color=color, markersize=9, label=f"{label} disabling")
        axes[0, 0].set_ylabel("retention: score over the edited facts")
        axes[0, 0].set_ylim(-0.02, 1.02)
        axes[0, 1].set_ylabel("WikiText-2 perplexity")
        _perplexity_axis(axes[0, 1])
        axes[1, 0].set_ylabel("mean probe accuracy")
        axes[1, 1].set_ylabel("||W - W0|| (Frobenius)")
        axes[1, 1].set_yscale("log")
        grid[0, 2].set_ylabel("neighbourhood score NS")
        grid[1, 2].set_ylabel("known facts still completed")
        for ax in grid[:, 2]:
            ax.set_ylim(-0.02, 1.02)
        legend = None
        if many:
            from matplotlib.lines import Line2D

            legend = [Line2D([], [], color=color, marker="o", label=label) for color, label in zip(colors, runs)]
            legend += [Line2D([], [], color="black", label=f"{key} (retention panel)", **SCORE_STYLE[key]) for key in ("ES", "S")]
        _finish(fig, grid.flat, out, title, shared_legend=legend)
    finally:
        plt.close("all")
    return out


def write_paper_columns(runs: dict[str, Path], out: Path, title: str) -> Path:
    """One panel per column of AlphaEdit's Table 1 (under each run's protocol), perplexity and
    ||W - W0||, each against the number of edits, one line per run (label -> run folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.metrics.protocols import COLUMNS
    from experiments.reporting.summary import paper_curve

    panels = (*COLUMNS, "perplexity", "||W - W0||")
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    try:
        curves = {label: paper_curve(path) for label, path in runs.items()}
        for ax, column in zip(axes.flat, panels):
            for i, (label, curve) in enumerate(curves.items()):
                points = [(row["edits"], row[column]) for row in curve if row[column] is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", color=f"C{i}", label=label)
            ax.set_ylabel(column)
        _perplexity_axis(axes.flat[panels.index("perplexity")])
        axes.flat[len(panels) - 1].set_yscale("symlog")  # ||W - W0|| starts at 0 and grows by orders
        axes.flat[len(panels)].axis("off")
        _finish(fig, list(axes.flat)[: len(panels)], out, title)
    finally:
        plt.close("all")
    return out


BATCH_SCORES = ("ES", "PS", "NS", "S", "known", "perplexity")


def batch_size_points(summary: dict[str, Any]) -> dict[str, float | None]:
    """A run's scores for the batch-size plot: a batched run's facts right after their own batch
    (mean over batches), a sequential-batched run's retention after its last edit; the known-facts
    probe and perplexity at its last evaluation."""
    scores = summary["current"] if summary["mode"] == "batched" else (summary["retained"] or {})
    last = lambda pair, key: (pair["last"] or {}).get(key) if pair else None  # noqa: E731
    return {**{k: scores.get(k) for k in SCORES}, "known": last(summary.get("known"), "accuracy"),
            "perplexity": last(summary.get("perplexity"), "perplexity")}


def batch_size_lines(summaries: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, dict[str, float | None]]]]:
    """(editor, mode) -> [(batch size, scores)], sorted by batch size. A batched run whose one batch
    holds all its edits is also the sequential-batched run at that size (one batch, nothing before it),
    so it ends that editor's sequential-batched line too, where the editor has one."""
    lines: dict[tuple[str, str], list[tuple[int, dict[str, float | None]]]] = {}
    for summary in summaries:
        lines.setdefault((summary["alg_name"], summary["mode"]), []).append((summary["batch_size"], batch_size_points(summary)))
    for summary in summaries:
        sequential = lines.get((summary["alg_name"], "sequential-batched"))
        if (summary["mode"] == "batched" and summary["batch_size"] >= summary["n_edits"] and sequential is not None
                and summary["batch_size"] not in [size for size, _ in sequential]):
            sequential.append((summary["batch_size"], batch_size_points(summary)))
    return {key: sorted(points, key=lambda point: point[0]) for key, points in lines.items()}


def write_batch_sizes(summaries: list[dict[str, Any]], out: Path, title: str) -> Path:
    """One panel per score against the batch size (log scale), one line per editor and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = batch_size_lines(summaries)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    try:
        for ax, score in zip(axes.flat, BATCH_SCORES):
            for i, ((alg, mode), points) in enumerate(sorted(lines.items())):
                xy = [(size, values[score]) for size, values in points if values[score] is not None]
                if xy:
                    ax.plot(*zip(*xy), marker="o", color=f"C{i}", linestyle="-" if mode == "batched" else "--", label=f"{alg} {mode}")
            ax.set_xscale("log", base=2)
            ax.set_ylabel(score if score != "known" else "known facts still completed")
            if score == "perplexity":
                _perplexity_axis(ax)
        for ax in axes.flat:
            ax.set_xlabel("edits per batch")
        fig.suptitle(title)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = out.with_name(out.stem + ".partial.png")
        with writing(out, "the plot is drawn again by reproduce.py --report_only"):
            fig.savefig(tmp, dpi=110)
            tmp.replace(out)
    finally:
        plt.close("all")
    return out
