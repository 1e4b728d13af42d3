"""What a new user following the README tripped over (issue 29), one test each: statistics for the
layer the shipped hparams edit, a demo and a SIGTERM that say how to continue, the notebook API
finding the command line's statistics, summaries and plots that show only what was measured, and
progress bars that do not run into log lines."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import experiments.pipeline.run as run_module
from editors import edit, load_algorithm_hparams
from experiments import key_stats
from experiments.evaluate import options_from_argv
from experiments.pipeline.run import run
from experiments.pipeline.runlock import RunLock
from experiments.reporting.summary import build_summary, markdown_table, summary_markdown
from experiments.summarize import main as summarize_main
from tests.helpers import REQUESTS, context, failing_after, tiny_hparams
from tests.test_evaluate import case_line, edit_line, probe, write_lines
from tests.test_evaluate_run import fresh, options  # noqa: F401 (fixtures)
from util.cli import Terminated, run_cli
from util.files import read_jsonl
from util.models import load_model
from util.paths import PROJECT_ROOT, slug


README = (PROJECT_ROOT / "README.md").read_text()


def test_key_statistics_default_to_the_layers_the_shipped_hparams_edit():
    shipped = load_algorithm_hparams("R-ROME", "smollm2-135m.yaml")
    args = key_stats.parse_args(["--model_name", "smollm2-135m"])
    assert [int(x) for x in str(args.layers).split(",")] == shipped.layers
    assert (args.n_samples, args.sample_tokens, args.dtype) == (shipped.mom2_n_samples, shipped.mom2_sample_tokens, shipped.mom2_dtype)
    # the README's commands for the embedded model compute the layers its hparams edit
    for command in re.findall(r"key_stats\.py --model_name smollm2-135m[^\n]*", README):
        layers = re.search(r"--layers ([\d,]+)", command)
        assert layers is None or [int(x) for x in layers.group(1).split(",")] == shipped.layers, command


def failing_at(call: int, error: type[BaseException]):
    """An apply_edits that raises `error` in its `call`-th call, after editing (as a signal would)."""
    return failing_after(run_module.apply_edits)(call, error)


def test_sigterm_says_how_to_continue_and_that_command_continues(options, tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(run_module, "apply_edits", failing_at(2, Terminated))
    with caplog.at_level(logging.WARNING), pytest.raises(Terminated):
        run(options, fresh(tokenizer), tiny_hparams())
    (path,) = Path(options.results_dir).glob("R-ROME/run_*")
    command = f"python experiments/evaluate.py --continue_from_run {path}"
    assert any(f"continue with: {command}" in r.getMessage() for r in caplog.records), caplog.text
    monkeypatch.undo()
    again = options_from_argv(command.split()[2:], environment=options.environment)
    assert run(again, fresh(tokenizer)) == path
    assert json.loads((path / "summary.json").read_text())["status"] == "complete"


def test_an_interrupted_demo_summarises_and_says_how_to_continue(options, tokenizer, monkeypatch, capsys):
    from experiments import demo  # make demo's driver

    real_run = run

    def demo_options(argv):
        assert argv[: len(demo.FLAGS)] == demo.FLAGS  # the demo's own flags, then those given
        given = argv[argv.index("--continue_from_run") + 1] if "--continue_from_run" in argv else None
        return dataclasses.replace(options, continue_from_run=given)

    monkeypatch.setattr(demo, "options_from_argv", demo_options)
    monkeypatch.setattr(demo, "run", lambda o: real_run(o, fresh(tokenizer), None if o.continue_from_run else tiny_hparams()))
    monkeypatch.setattr(run_module, "apply_edits", failing_at(3, KeyboardInterrupt))  # Ctrl-C in the third edit
    with pytest.raises(SystemExit) as exit_info:
        run_cli(demo.main)
    err = capsys.readouterr().err
    (path,) = Path(options.results_dir).glob("R-ROME/run_*")
    assert exit_info.value.code == 130
    assert re.match(r"demo: runs r-ROME .* editing 5 hand-written facts .* roughly \d+ minutes on a 2-core CPU", err), err
    assert f"continue it with: make demo CONTINUE={path}" in err
    assert "| R-ROME | tiny-llama | sequential | 1 | 2 |" in err and "| interrupted |" in err  # the table of the edits done
    monkeypatch.setattr(run_module, "apply_edits", failing_at(99, KeyboardInterrupt))
    assert demo.main(["--continue_from_run", str(path)]) == 0
    assert "| complete |" in capsys.readouterr().out


def test_the_notebook_api_keys_statistics_by_the_embedded_name_as_the_command_line_does(tokenizer, tmp_path):
    """A model loaded as "smollm2-135m" is read from its dequantised folder, whose path the model
    remembers; edit() must cache its statistics under the name the command line uses."""
    from tests.conftest import tiny_llama_model

    folder = tmp_path / "models" / "smollm2-135m"  # a stand-in for the dequantised copy
    tiny_llama_model(len(tokenizer)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "smollm2-135m"}))
    tokenizer.save_pretrained(folder)
    lm = load_model("smollm2-135m", model_cache=tmp_path / "models")
    ctx = context(tmp_path)
    hparams = tiny_hparams()
    edit(lm.model, lm.tok, [REQUESTS[0]], hparams, context=ctx)
    assert [p.name for p in (tmp_path / "cache" / "stats").iterdir()] == [slug("smollm2-135m")]


@pytest.fixture
def run_folder(tmp_path):
    """A hand-made sequential run of 2 edits, evaluated only before its first edit."""
    path = tmp_path / "results" / "R-ROME" / "run_001"
    path.mkdir(parents=True)
    options = {"protocol": "alphaedit", "downstream_tasks": ["sst2"], "number_of_tests": 20, "number_of_few_shots": 0,
               "generation_test_interval": 0, "generation_tokens": 40}
    config = {"alg_name": "R-ROME", "model": "m", "mode": "sequential", "batch_size": 1, "seed": 0, "git_commit": "abc",
              "n_cases": 22, "hparams": {"layers": [3]}, "options": options}
    (path / "config.json").write_text(json.dumps(config))
    write_lines(path / "edits.jsonl", [edit_line(1, 1.0), edit_line(2, 1.5)])
    write_lines(path / "cases.jsonl", [case_line(1, 1, True), case_line(2, 2, True)])
    write_lines(path / "probes.jsonl", [probe(0, 0.8), {"kind": "perplexity", "n_edits": 0, "perplexity": 30.15, "seconds": 1.0}])
    return path


def test_a_run_without_evaluation_after_editing_shows_no_after_value(run_folder):
    summary = build_summary(run_folder, "paused")
    row = markdown_table([summary])
    assert "30.15 → -" in row and "30.15 → 30.15" not in row
    assert summary["perplexity"]["last"] is None and summary["paper"]["perplexity"] is None
    assert "last measured after 0 of these 2 edits" in summary_markdown(summary)


def test_the_protocol_header_names_what_ran(run_folder):
    header = summary_markdown(build_summary(run_folder, "paused")).split("\n")[2]
    assert "probes sst2 (20 items each, 0-shot)" in header and "no generation tests" in header, header
    assert "100 items, 6 tasks;" not in header and "first 100 items" not in header, header


def test_summarize_shows_runs_in_progress_and_unfinished_ones(run_folder, capsys):
    second = run_folder.parent / "run_002"
    second.mkdir()
    for name in ("config.json", "edits.jsonl", "cases.jsonl", "probes.jsonl"):
        (second / name).write_bytes((run_folder / name).read_bytes())
    lock = RunLock.acquire(second)  # run_002 is being written
    try:
        assert summarize_main([str(run_folder.parent)]) == 0
    finally:
        lock.release()
    captured = capsys.readouterr()
    rows = [line for line in captured.out.split("\n") if "| R-ROME |" in line]
    assert len(rows) == 2 and "| unfinished |" in rows[0] and f"| running: pid {os.getpid()} on " in rows[1], captured.out
    assert f"note: {run_folder} has no summary.json" in captured.err and f"note: {second} is being written" in captured.err


class Figures:
    """What each saved figure shows: per panel, its lines, texts, limits, tick labels and legend
    entries; per figure, the entries of its figure-level legends."""

    def __init__(self, monkeypatch):
        from matplotlib.figure import Figure

        self.saved: dict[str, list[dict]] = {}
        self.figure_legends: dict[str, list[int]] = {}
        real = Figure.savefig

        def savefig(fig, fname, *args, **kwargs):
            fig.canvas.draw()
            name = Path(fname).name.replace(".partial", "")
            self.saved[name] = [self.panel(ax) for ax in fig.axes if ax.axison]
            self.figure_legends[name] = [len(legend.get_texts()) for legend in fig.legends]
            return real(fig, fname, *args, **kwargs)

        monkeypatch.setattr(Figure, "savefig", savefig)

    @staticmethod
    def panel(ax) -> dict:
        return {"lines": {line.get_label(): line for line in ax.get_lines()}, "texts": [t.get_text() for t in ax.texts],
                "xlim": ax.get_xlim(), "yticks": [t.get_text() for t in ax.get_yticklabels() if t.get_text()],
                "offset": ax.yaxis.get_offset_text().get_text(), "yscale": ax.get_yscale(), "ylabel": ax.get_ylabel(),
                "legend": len(ax.get_legend().get_texts()) if ax.get_legend() else 0}


def plots_after_one_edit(run_folder: Path, monkeypatch, probes: bool) -> dict[str, list[dict]]:
    """The panels of the plots of a run paused after one edit and evaluated before it only."""
    from experiments.reporting.plots import write_plots

    write_lines(run_folder / "edits.jsonl", read_jsonl(run_folder / "edits.jsonl")[:1])
    write_lines(run_folder / "probes.jsonl", [probe(0, 0.8)] * probes + [
        {"kind": "perplexity", "n_edits": 0, "perplexity": 24.4556, "seconds": 1.0},
        {"kind": "retention", "n_edits": 1, "ES": 1.0, "PS": 1.0, "NS": 1.0, "S": 1.0, "seconds": 1.0}])
    figures = Figures(monkeypatch)
    write_plots(run_folder)
    return figures.saved


def test_plots_after_one_edit_have_readable_axes(run_folder, monkeypatch):
    for name, panels in plots_after_one_edit(run_folder, monkeypatch, probes=True).items():
        for panel in panels:
            if panel["lines"]:
                assert panel["xlim"][1] - panel["xlim"][0] >= 1, (name, panel["xlim"])
                assert not panel["offset"] and len(set(panel["yticks"])) == len(panel["yticks"]) > 1, (name, panel["yticks"])


def test_plots_without_probe_tasks_have_no_empty_panels(run_folder, monkeypatch):
    saved = plots_after_one_edit(run_folder, monkeypatch, probes=False)  # --downstream_tasks none
    assert len(saved["downstream.png"]) == 1, "no empty probe panels without probe tasks"
    for name, panels in saved.items():
        for panel in panels:
            assert panel["lines"] or panel["texts"], f"{name}: an empty panel that does not say why"


def test_equal_scores_do_not_hide_es(run_folder, monkeypatch):
    retention = plots_after_one_edit(run_folder, monkeypatch, probes=True)["retention.png"][0]["lines"]
    assert retention["ES"].get_zorder() > max(retention[k].get_zorder() for k in ("PS", "NS", "S"))  # ES on top
    assert len({retention[k].get_marker() for k in ("ES", "PS", "NS", "S")}) == 4


def test_the_comparison_plot_draws_es_above_s(run_folder, monkeypatch, tmp_path):
    from experiments.reporting.plots import write_comparison

    write_lines(run_folder / "probes.jsonl", [{"kind": "retention", "n_edits": n, "ES": 1.0, "PS": 1.0, "NS": 1.0, "S": 1.0,
                                               "seconds": 1.0} for n in (1, 2)])
    figures = Figures(monkeypatch)
    write_comparison({"R-ROME": run_folder}, tmp_path / "comparison.png", "t")
    scores = figures.saved["comparison.png"][0]["lines"]
    assert scores["R-ROME ES"].get_zorder() > scores["R-ROME S"].get_zorder()
    assert scores["R-ROME ES"].get_marker() != scores["R-ROME S"].get_marker()


def test_a_comparison_of_many_runs_has_one_legend_beside_the_panels(run_folder, monkeypatch, tmp_path):
    """Study b compares 18 runs: a legend per panel would cover the panels, and ten colours repeat."""
    from experiments.reporting.plots import write_comparison

    write_lines(run_folder / "probes.jsonl", [{"kind": "retention", "n_edits": n, "ES": 1.0, "PS": 1.0, "NS": 1.0, "S": 1.0,
                                               "seconds": 1.0} for n in (1, 2)])
    figures = Figures(monkeypatch)
    write_comparison({"one": run_folder}, tmp_path / "few.png", "t")
    labels = [f"run {i}" for i in range(12)]
    write_comparison(dict.fromkeys(labels, run_folder), tmp_path / "many.png", "t")
    # per panel
    assert figures.figure_legends["few.png"] == [] and any(panel["legend"] for panel in figures.saved["few.png"])
    # one beside them: the runs, then ES and S
    assert figures.figure_legends["many.png"] == [12 + 2] and not any(panel["legend"] for panel in figures.saved["many.png"])
    colors = {str(figures.saved["many.png"][0]["lines"][f"{label} ES"].get_color()) for label in labels}
    assert len(colors) == 12


@pytest.mark.parametrize("perplexities, scale", [((30.15, 34.1, 38.1), "linear"), ((30.15, 61.5, 423.0, 1.0e5), "log")])
def test_perplexity_goes_on_a_log_axis_once_it_spans_ten_times(run_folder, monkeypatch, tmp_path, perplexities, scale):
    """A collapse (30 -> 10^5) must not flatten the gradual rise before it onto the axis."""
    from experiments.reporting.plots import write_comparison, write_plots

    write_lines(run_folder / "probes.jsonl", [{"kind": "perplexity", "n_edits": 500 * i, "perplexity": p, "seconds": 1.0}
                                              for i, p in enumerate(perplexities)])
    figures = Figures(monkeypatch)
    write_plots(run_folder)
    write_comparison({"MEMIT": run_folder}, tmp_path / "comparison.png", "t")
    panels = [panel for name in ("downstream.png", "comparison.png") for panel in figures.saved[name] if "perplexity" in panel["ylabel"]]
    assert len(panels) == 2 and {panel["yscale"] for panel in panels} == {scale}


LOGGED_BAR = """
import logging, time
import torch
from tests.conftest import tiny_llama_model
from util.arch import arch_for
from util.cli import run_cli
from util.models import LoadedModel
from util.stats import accumulate_second_moments
try:
    import util.progress
    util.progress.LOG_INTERVAL = 0.2  # a line every 0.2 s instead of every 30 s
except ImportError:
    pass

log = logging.getLogger("test")


def windows():
    for i in range(12):
        time.sleep(0.1)
        if i == 6:
            log.info("a log line in the middle of a bar")
        yield torch.arange(16)


def main():
    model = tiny_llama_model(64)
    log.info("computing")
    accumulate_second_moments(LoadedModel(model, None, arch_for(model), "tiny"), [1], windows(), 12, 1)
    log.info("done")


run_cli(main)
"""


def test_progress_bars_write_whole_lines_into_a_log(tmp_path):
    """stderr redirected to a file: no carriage returns, and every line a log line or a bar line."""
    log_file = tmp_path / "run.log"
    with log_file.open("w") as stderr:
        subprocess.run([sys.executable, "-c", LOGGED_BAR], stderr=stderr, cwd=PROJECT_ROOT, timeout=300, check=True,
                       env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"})
    text = log_file.read_text()
    assert "\r" not in text, repr(text)
    lines = text.strip().split("\n")
    logged = [line for line in lines if line.startswith("INFO ")]
    bars = [line for line in lines if line.startswith("key statistics:")]
    assert len(logged) == 3 and "a log line in the middle of a bar" in logged[1] and len(bars) >= 2, text
    assert len(logged) + len(bars) == len(lines), text
    assert bars[-1].startswith("key statistics: 100%") and "12/12" in bars[-1]
