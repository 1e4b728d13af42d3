"""The run pipeline follows the parameters an editor declares (Editor.edited_params), not the down
projections: FT-L over the whole MLP of layer 1 of a tiny Llama (gate, up and down projections)
is restored after every batch of a batched run and after a Ctrl-C, checkpointed and continued
bitwise, counted in ||W - W0||, and exported; an edit that changes an undeclared parameter stops
the run in one line."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from editors import ALGORITHMS
from experiments.pipeline.export import export_run
from experiments.pipeline.run import run
import experiments.pipeline.run as run_module
from ft.ft_main import FTHyperParams
from rome.editor import EditResult
from tests.helpers import failing_after, run_options
from tests.test_evaluate_run import contents, fresh
from util.deltas import snapshot
from util.errors import RunError
from util.files import read_jsonl
from util.hparams import build_hparams


MLP = ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def ft_mlp() -> FTHyperParams:
    return build_hparams(FTHyperParams, {"layers": [1], "site": "mlp", "num_steps": 3, "lr": 1e-3, "norm_constraint": 1e-3},
                         "tiny FT-L hparams", ALGORITHMS["FT-L"].fixed)


@pytest.fixture
def options(tmp_path):
    return dataclasses.replace(run_options(tmp_path), alg_name="FT-L", downstream_tasks=(), generation_test_interval=0)


def test_ft_l_over_a_whole_mlp_is_declared(tiny_llama):
    assert ALGORITHMS["FT-L"].edited_params(tiny_llama, ft_mlp()) == MLP


def test_checkpoint_continue_drift_and_export_cover_the_whole_mlp(options, tokenizer, tmp_path, monkeypatch):
    start = snapshot(fresh(tokenizer).model, MLP)
    reference_lm = fresh(tokenizer)
    reference = run(options, reference_lm, ft_mlp())
    config = json.loads((reference / "config.json").read_text())
    assert config["edited_params"] == MLP
    final = snapshot(reference_lm.model, MLP)
    assert all(not torch.equal(final[name], start[name]) for name in MLP)  # every projection moved
    health = read_jsonl(reference / "edits.jsonl")[-1]["health"]
    assert [m["param"] for m in health["matrices"]] == MLP
    drift = math.sqrt(sum((final[name].double() - start[name].double()).norm().item() ** 2 for name in MLP))
    assert health["drift_norm"] == pytest.approx(drift, rel=1e-12)

    # a crash in edit 4 (checkpoint at 2), a Ctrl-C in edit 4 of the continued run (rolled back to
    # 3: every MLP matrix as the checkpoint holds it), then the rest: the reference's files and weights
    real_apply = run_module.apply_edits
    failing_at = failing_after(real_apply)

    monkeypatch.setattr(run_module, "apply_edits", failing_at(4, RuntimeError))
    with pytest.raises(RuntimeError):
        run(options, fresh(tokenizer), ft_mlp())
    path = reference.parent / "run_002"
    again = dataclasses.replace(options, continue_from_run="run_002")
    monkeypatch.setattr(run_module, "apply_edits", failing_at(2, KeyboardInterrupt))
    interrupted = fresh(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        run(again, interrupted)
    state = json.loads((path / "checkpoint" / "state.json").read_text())
    assert state["n_edits"] == 3
    checkpointed = load_file(str(path / "checkpoint" / state["files"]["weights"]))
    assert sorted(checkpointed) == sorted(MLP)
    for name in MLP:  # the interrupted batch was rolled back to the checkpoint, bitwise
        assert torch.equal(interrupted.model.get_parameter(name), checkpointed[name]), name
    monkeypatch.setattr(run_module, "apply_edits", real_apply)
    lm = fresh(tokenizer)
    run(again, lm)
    assert contents(path) == contents(reference)
    for name in MLP:
        assert torch.equal(lm.model.get_parameter(name), final[name]), name

    exported = AutoModelForCausalLM.from_pretrained(export_run(path, tmp_path / "exported", lm=fresh(tokenizer)))
    for name in MLP:
        assert torch.equal(exported.get_parameter(name), final[name]), name


def test_batched_runs_restore_the_whole_mlp(options, tokenizer):
    lm = fresh(tokenizer)
    start = snapshot(lm.model, MLP)
    batched = dataclasses.replace(options, sequential=False, num_edits=2, dataset_size_limit=4)
    path = run(batched, lm, ft_mlp())
    edits = read_jsonl(path / "edits.jsonl")
    assert len(edits) == 2 and all(e["health"]["delta_norm"] > 0 for e in edits)
    # each batch edited W0 (drift = its own change) and was undone afterwards
    assert all(e["health"]["drift_norm"] == pytest.approx(e["health"]["delta_norm"], rel=1e-6) for e in edits)
    for name in MLP:
        assert torch.equal(lm.model.get_parameter(name), start[name]), name


def test_an_undeclared_change_stops_the_run(options, tokenizer, monkeypatch):
    real_apply = run_module.apply_edits

    def apply(session, records):  # an editor that also changes layer 0, which FT-L does not declare
        result = real_apply(session, records)
        name = "model.layers.0.mlp.down_proj.weight"
        return EditResult({**result.deltas, name: torch.zeros(1)}, result.originals, result.requests, result.layers,
                          result.value_deltas)

    monkeypatch.setattr(run_module, "apply_edits", apply)
    with pytest.raises(RunError, match="FT-L changed model.layers.0.mlp.down_proj.weight, which it does not declare"):
        run(options, fresh(tokenizer), ft_mlp())


def test_ultraedit_continues_exactly_and_exports_its_projections(options, tokenizer, tmp_path, monkeypatch):
    """UltraEdit's running statistics (EditContext.state) come back from the checkpoint: a run that
    crashed in edit 4 and was continued equals an uninterrupted one, gate and up projections included."""
    from ultraedit.ultraedit_main import UltraEditHyperParams

    hp = build_hparams(UltraEditHyperParams, {"modules": {"mlp_gate": [1], "mlp_up": [2]}, "lr": 1e-3, "batch_size": 2}, "tiny")
    names = ["model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    ultra = dataclasses.replace(options, alg_name="UltraEdit")
    reference_lm = fresh(tokenizer)
    reference = run(ultra, reference_lm, hp)
    assert json.loads((reference / "config.json").read_text())["edited_params"] == names
    monkeypatch.setattr(run_module, "apply_edits", failing_after(run_module.apply_edits)(4, RuntimeError))
    with pytest.raises(RuntimeError):
        run(ultra, fresh(tokenizer), hp)
    monkeypatch.undo()
    lm = fresh(tokenizer)
    path = run(dataclasses.replace(ultra, continue_from_run="run_002"), lm)
    assert contents(path) == contents(reference)
    exported = AutoModelForCausalLM.from_pretrained(export_run(path, tmp_path / "exported", lm=fresh(tokenizer)))
    for name in names:
        assert torch.equal(lm.model.get_parameter(name), reference_lm.model.get_parameter(name)), name
        assert torch.equal(exported.get_parameter(name), reference_lm.model.get_parameter(name)), name
