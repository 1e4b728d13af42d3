"""The run loop on a tiny random Llama: folder contents, modes, stop on collapse, and resume
equality (a crash and a Ctrl-C, each continued, give the files and weights of an uninterrupted run)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from emmet.emmet_main import EMMETHyperParams
from experiments.pipeline.run import run
import experiments.pipeline.run as run_module
import experiments.pipeline.session as session_module
from experiments.reporting.summary import code_text, table_row
from experiments.pipeline.run_config import HealthThresholds, RunOptions
from tests.conftest import fresh_llama
from tests.helpers import failing_after, run_options, tiny_hparams
from util.errors import RunError
from util.files import read_jsonl
from util.models import LoadedModel
from rome.editor import EditContext

fresh = fresh_llama


@pytest.fixture
def options(tmp_path) -> RunOptions:
    return run_options(tmp_path)


def without_times(value):
    """Records minus wall-clock fields (and shares of wall time), and the sessions a run took (parts),
    the only ones allowed to differ between equal runs."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if "second" not in k and k not in ("run", "evaluation_share", "parts")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def contents(path) -> dict:
    files = {name: without_times(read_jsonl(path / f"{name}.jsonl")) for name in ("edits", "probes", "cases")}
    files["summary"] = without_times(json.loads((path / "summary.json").read_text()))
    return files


def edited(lm: LoadedModel) -> torch.Tensor:
    return lm.model.get_parameter(lm.arch.weight_name(1)).detach().clone()


def test_run_folder_holds_every_file(options, tokenizer, caches, monkeypatch):
    closed, close = [], EditContext.close
    monkeypatch.setattr(EditContext, "close", lambda ctx: closed.append(ctx) or close(ctx))
    path = run(options, fresh(tokenizer), tiny_hparams())
    assert len(closed) == 1, "the run closes the EditContext it opened (what its replays registered)"
    # the caches went where the options' environment says (the test's folders, tests/conftest.py)
    assert options.environment.caches == caches
    for folder, pattern in ((caches.templates, "*.json"), (caches.stats, "*.safetensors"), (caches.tfidf, "*.json"),
                            (caches.file_hashes, "*")):
        assert list(folder.rglob(pattern)), folder
    assert path.name == "run_001" and path.parent.name == "R-ROME"
    for name in ("config.json", "edits.jsonl", "probes.jsonl", "cases.jsonl", "summary.json", "summary.md",
                 "downstream.png", "retention.png", "norms.png"):
        assert (path / name).stat().st_size > 0, name
    assert (path / "downstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((path / "config.json").read_text())
    assert config["mode"] == "sequential" and config["hparams"]["layers"] == [1] and config["git_commit"]
    assert set(config["data"]) == {"cases", "probe:sst2", "perplexity"} and len(config["data"]["cases"]["sha256"]) == 64
    edits = read_jsonl(path / "edits.jsonl")
    assert [e["n_edits"] for e in edits] == [1, 2, 3, 4, 5]
    assert all(e["health"]["delta_norm"] > 0 and e["requests"] and e["layers"] for e in edits)
    assert edits[-1]["health"]["drift_norm"] > edits[0]["health"]["drift_norm"]
    rows = read_jsonl(path / "probes.jsonl")

    def points(kind):
        return [r["n_edits"] for r in rows if r["kind"] == kind]
    assert points("probe") == points("perplexity") == [0, 2, 4, 5]
    assert points("retention") == [2, 4, 5] and points("generation") == [0, 2, 4, 5]
    phases = [(c["phase"], c["n_edits"]) for c in read_jsonl(path / "cases.jsonl")]
    assert phases.count(("retention", 5)) == 5 and sum(p == "current" for p, _ in phases) == 5
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["retained"]["n_cases"] == 5 and summary["n_edits"] == 5


def test_resume_after_crash_and_ctrl_c_equals_uninterrupted_run(options, tokenizer, monkeypatch):
    reference_lm = fresh(tokenizer)
    reference = run(options, reference_lm, tiny_hparams())
    real_apply = run_module.apply_edits
    failing_at = failing_after(real_apply)

    monkeypatch.setattr(run_module, "apply_edits", failing_at(4, RuntimeError))  # crash in edit 4: checkpoint at 2
    with pytest.raises(RuntimeError):
        run(options, fresh(tokenizer), tiny_hparams())
    path = reference.parent / "run_002"
    assert len(read_jsonl(path / "edits.jsonl")) == 3 and json.loads((path / "checkpoint" / "state.json").read_text())["n_edits"] == 2
    again = dataclasses.replace(options, continue_from_run="run_002")
    monkeypatch.setattr(run_module, "apply_edits", failing_at(2, KeyboardInterrupt))  # Ctrl-C in edit 4: rolled back to 3
    with pytest.raises(KeyboardInterrupt):
        run(again, fresh(tokenizer))
    assert json.loads((path / "summary.json").read_text())["status"] == "interrupted"
    assert len(read_jsonl(path / "edits.jsonl")) == 3 and json.loads((path / "checkpoint" / "state.json").read_text())["n_edits"] == 3
    monkeypatch.setattr(run_module, "apply_edits", real_apply)
    lm = fresh(tokenizer)
    assert run(again, lm) == path
    assert contents(path) == contents(reference)
    assert torch.equal(edited(lm), edited(reference_lm))
    with pytest.raises(RunError, match="num_edits"):
        run(dataclasses.replace(again, num_edits=2), fresh(tokenizer))


def test_stop_after_pauses_and_continues(options, tokenizer, monkeypatch):
    first = run(dataclasses.replace(options, stop_after=3), fresh(tokenizer), tiny_hparams())
    paused = json.loads((first / "summary.json").read_text())
    assert paused["status"] == "paused"
    assert len(read_jsonl(first / "edits.jsonl")) == 3
    assert [(p["at_edits"], p["git_commit"]) for p in paused["parts"]] == [(0, paused["git_commit"])]
    # the second part runs other code: the summary names both commits, part by part
    monkeypatch.setattr(session_module, "git_commit", lambda fallback=None: "f" * 40)
    run(dataclasses.replace(options, continue_from_run=first.name), fresh(tokenizer))
    summary = json.loads((first / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert len(read_jsonl(first / "edits.jsonl")) == 5
    assert [(p["at_edits"], p["git_commit"], p["device"]) for p in summary["parts"]] == [
        (0, paused["git_commit"], "cpu"), (3, "f" * 40, "cpu")]
    assert summary["git_commit"] == paused["git_commit"]  # the config's: the run's first part
    assert table_row(summary, [])["commit"] == f"{paused['git_commit'][:7]}+fffffff"
    assert "from 3 edits on cpu, code ffffffffffff" in (first / "summary.md").read_text()


def test_code_text_names_each_parts_commit_once_in_order():
    part = lambda commit: {"at_edits": 0, "device": "cpu", "git_commit": commit}  # noqa: E731
    assert code_text({"git_commit": "a" * 40}) == "aaaaaaa"  # a summary from before parts were recorded
    assert code_text({"git_commit": "a" * 40, "parts": [part("a" * 40)]}) == "aaaaaaa"
    # parts continued before sessions recorded their commit show as "?"; repeats merge
    assert code_text({"parts": [part("a" * 40), part(None), part(None), part("b" * 40), part("b" * 40)]}) == "aaaaaaa+?+bbbbbbb"


def test_batched_modes_and_stop_on_collapse(options, tokenizer):
    hparams = tiny_hparams(EMMETHyperParams, layers=[1, 2])
    lm = fresh(tokenizer)
    start = edited(lm)
    batched = dataclasses.replace(options, alg_name="EMMET", sequential=False, num_edits=2, dataset_size_limit=4,
                                  generation_test_interval=0)
    path = run(batched, lm, hparams)
    assert torch.equal(edited(lm), start)  # independent batches: W0 restored after each
    edits = read_jsonl(path / "edits.jsonl")
    assert [e["case_ids"] for e in edits] == [[0, 1], [2, 3]] and len(edits[0]["health"]["matrices"]) == 2
    assert all(e["health"]["drift_norm"] == pytest.approx(e["health"]["delta_norm"]) for e in edits)
    collapse = dataclasses.replace(batched, sequential=True, stop_on_collapse=True, dataset_size_limit=5, downstream_eval_steps=4,
                                   health=HealthThresholds(norm_jump=1e-6, min_history=1))
    path = run(collapse, fresh(tokenizer), hparams)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "collapsed" and summary["n_edits"] == 4 and summary["n_disabling"] == 1
    assert summary["retained"]["n_edits"] == 4 and summary["probes"]["sst2"]["last"]["n_edits"] == 4
