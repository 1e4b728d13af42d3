"""An edited model taken away: --save_model and experiments/export.py write a Hugging Face folder
that AutoModelForCausalLM.from_pretrained loads, with the run's edits in it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.cases import load_cases
from experiments.metrics.counterfact import evaluate_cases
from experiments.pipeline.export import EXPORT_INFO, export_run
from experiments.pipeline.run import run
from tests.conftest import tiny_llama_model
from tests.helpers import tiny_hparams
from tests.test_evaluate_run import fresh, options  # noqa: F401 (fixtures)
from util.arch import arch_for
from util.errors import RunError
from util.models import LoadedModel
from util.paths import PROJECT_ROOT



def loaded(folder) -> LoadedModel:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), arch_for(model), str(folder))


def test_saved_and_exported_models_load_with_their_edits(options, tokenizer, tmp_path):
    lm = fresh(tokenizer)
    quick = dataclasses.replace(options, save_model=True, dataset_size_limit=3, downstream_tasks=(),
                                generation_test_interval=0, downstream_eval_steps=0)
    path = run(quick, lm, tiny_hparams())
    saved = loaded(path / "model_000003")
    for name, value in lm.model.state_dict().items():  # every tensor, edited or not, bitwise
        assert torch.equal(saved.model.state_dict()[name], value), name
    assert json.loads((path / "model_000003" / EXPORT_INFO).read_text())["n_edits"] == 3

    # The edited facts: the loaded folder scores them as the run's model does, and target_new is
    # more likely after each rewrite prompt than in the unedited model (a tiny random model's
    # targets start near uniform, ~10.6 nats, and these short edits move them by 0.04-0.14).
    records = load_cases("custom", limit=3, custom_path=quick.custom_path)

    def nll_new(model):  # mean per-token NLL of target_new after each rewrite prompt
        return torch.tensor([r.rewrite[0].nll_new for r in evaluate_cases(model, records)])

    after = nll_new(saved)
    torch.testing.assert_close(after, nll_new(lm))
    before = nll_new(fresh(tokenizer))
    assert (after < before).all() and (before - after).mean() > 0.05, (before, after)

    # experiments/export.py from the run folder: the same model
    exported = loaded(export_run(path, tmp_path / "exported", lm=fresh(tokenizer)))
    name = lm.arch.weight_name(1)
    assert torch.equal(exported.model.get_parameter(name), lm.model.get_parameter(name))
    with pytest.raises(RunError, match="no checkpoint after 2 edits"):
        export_run(path, tmp_path / "x", at=2, lm=fresh(tokenizer))
    other = tiny_llama_model(len(tokenizer), seed=1)
    with pytest.raises(RunError, match="differ from those the run started from"):
        export_run(path, tmp_path / "x", lm=LoadedModel(other, tokenizer, arch_for(other), "tiny-llama"))


def test_save_model_needs_a_sequential_run(options):
    with pytest.raises(RunError, match="--save_model needs --sequential"):
        dataclasses.replace(options, save_model=True, sequential=False).validate()


@pytest.mark.slow
def test_embedded_model_export_keeps_an_edited_fact(embedded, shared_data, tmp_path, embedded_caches):
    """R-ROME makes the embedded model say "Rome" for France's capital; the saved folder does too."""
    from experiments.pipeline.export import save_model_folder
    from rome.editor import EditContext
    from editors import ALGORITHMS, load_algorithm_hparams
    from util.deltas import restore

    records = load_cases("custom", limit=1, custom_path=PROJECT_ROOT / "data" / "demo_edits.yaml")
    hparams = load_algorithm_hparams("R-ROME", "smollm2-135m.yaml")
    assert not evaluate_cases(embedded, records)[0].rewrite[0].argmax
    edit = ALGORITHMS["R-ROME"].apply(embedded, [records[0].request], hparams,
                                      EditContext(embedded_caches, seed=0, corpus_path=str(shared_data / "wiki")))
    try:
        folder = save_model_folder(embedded, tmp_path / "model", {"test": True})
    finally:
        restore(embedded.model, edit.originals)
    result = evaluate_cases(loaded(folder), records)[0]
    assert result.rewrite[0].argmax, "the exported model's top answer to 'The capital of France is' is Rome"


def test_export_cli_ends_in_one_line_on_a_folder_that_is_no_run(tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "experiments" / "export.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 2 and out.stderr.strip() == f"error: {tmp_path}: not a run folder (no config.json)"
