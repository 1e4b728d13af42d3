"""Hparams derived for a model without shipped ones (experiments/derive_hparams.py, `--hparams auto`),
and evaluate.py / layer_sweep.py end to end on tiny local folders of new families with them."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import experiments.derive_hparams as derive_hparams
from editors import ALGORITHMS, hparams_path, load_algorithm_hparams
from experiments.evaluate import main as evaluate_main
from experiments.layer_sweep import sweep
from experiments.tiny_model import tiny_config, write_tiny_model
from tests.helpers import write_corpus, write_run_data
from tests.test_arch import LISTED
from util.arch import arch_for
from util.errors import HparamsError
from util.models import LoadedModel, shape_model
from util.paths import PROJECT_ROOT


@pytest.fixture
def hparams_dir(tmp_path, monkeypatch):
    """Derived files go to a temporary hparams/ (the repository's stays as it is)."""
    folder = tmp_path / "hparams"
    monkeypatch.setattr(derive_hparams, "HPARAMS_DIR", folder)
    return folder


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    return lambda model_type: write_tiny_model(model_type, tmp_path / f"tiny-{model_type}", tokenizer)


def test_relative_depth_maps_the_references_onto_themselves_and_scales():
    for alg in ALGORITHMS:
        for reference, n in derive_hparams.REFERENCE_DEPTH.items():
            if not hparams_path(alg, reference).is_file():
                continue
            hp = load_algorithm_hparams(alg, reference)
            if hasattr(hp, "v_loss_layer"):
                assert hp.v_loss_layer == n - 1  # every shipped file reads the loss at its last layer
            for layers in [hp.layers] if hasattr(hp, "layers") else hp.modules.values():
                assert derive_hparams.scaled_layers(layers, n, n) == layers
    assert derive_hparams.scaled_layers([4, 5, 6, 7, 8], 32, 16) == [2, 3, 4]
    assert derive_hparams.scaled_layers([4, 5, 6, 7, 8], 32, 64) == list(range(8, 17))
    assert derive_hparams.scaled_layers([17], 48, 12) == [4] and derive_hparams.scaled_layers([5], 32, 4) == [1]
    assert derive_hparams.scaled_layers([13, 14, 15, 16, 17], 48, 4) == [1]


@pytest.mark.parametrize("model_type", LISTED)
def test_arch_derived_hparams_are_complete_for_every_family(model_type, tokenizer):
    with torch.device("meta"):  # the shape alone, as --hparams auto reads it
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer))
    lm = LoadedModel(model, tokenizer, arch_for(model), f"tiny-{model_type}")
    for alg in ALGORITHMS:
        source = derive_hparams.reference_file(alg, model_type)
        if alg == "UltraEdit" and model_type == "phi3":  # its reference edits gate projections, which Phi-3 fuses with up
            with pytest.raises(HparamsError, match="site 'mlp_gate' is not in the architecture table"):
                derive_hparams.derive(alg, lm)
            continue
        derived = derive_hparams.derive(alg, lm)
        reference = load_algorithm_hparams(alg, source)
        hp = derived.hparams
        assert type(hp) is ALGORITHMS[alg].hparams_class
        for layers in [hp.layers] if hasattr(hp, "layers") else hp.modules.values():
            assert layers and all(0 <= layer <= 3 for layer in layers)
        if hasattr(hp, "v_loss_layer"):  # the editors that optimise values and solve with key statistics
            assert hp.v_loss_layer == 3
            assert hp.mom2_sample_tokens <= lm.model.config.max_position_embeddings
            assert hp.mom2_n_samples * hp.mom2_sample_tokens >= derive_hparams.TOKENS_PER_KEY_DIM * 96  # m = 96
        same = {"layers", "modules", "v_loss_layer", "mom2_n_samples", "mom2_sample_tokens"}
        assert {k: v for k, v in vars(hp).items() if k not in same} == {k: v for k, v in vars(reference).items() if k not in same}
        assert derived.header.startswith(derive_hparams.DERIVED) and f"hparams/{alg}/{source}.yaml" in derived.header
        assert ALGORITHMS[alg].edited_params(lm, hp)  # what it would edit exists in the model


def test_auto_writes_a_derived_file_once_and_keeps_it(tiny_folder, caches, hparams_dir, monkeypatch):
    folder = str(tiny_folder("phi3"))
    path = derive_hparams.derived_file("MEMIT", folder, caches.models)
    assert path.parent == hparams_dir / "MEMIT" and path.read_text().startswith(derive_hparams.DERIVED)
    loaded = load_algorithm_hparams("MEMIT", str(path))
    assert loaded == derive_hparams.derive("MEMIT", shape_model(folder, model_cache=caches.models)).hparams
    refined = path.read_text().replace("layers: [1]", "layers: [2]")  # refined by hand after a layer sweep
    path.write_text(refined)
    assert derive_hparams.resolve("MEMIT", "auto", folder, caches.models) == str(path) and path.read_text() == refined
    assert derive_hparams.resolve("MEMIT", "mine.yaml", folder, caches.models) == "mine.yaml"
    # a model with shipped hparams keeps them: auto is the file there when there is one
    monkeypatch.setattr(derive_hparams, "HPARAMS_DIR", PROJECT_ROOT / "hparams")
    assert derive_hparams.resolve("R-ROME", "auto", "smollm2-135m", caches.models) == str(PROJECT_ROOT / "hparams" / "R-ROME" / "smollm2-135m.yaml")


def evaluate_argv(folder, tmp_path, *extra) -> list[str]:
    """A small CPU run: two demo edits, one probe task, data and corpus written under tmp_path."""
    data = write_run_data(tmp_path)
    return ["--model_name", str(folder), "--hparams", "auto", "--ds_name", "custom",
            "--custom_path", str(PROJECT_ROOT / "data" / "demo_edits.yaml"), "--dataset_size_limit", "2", "--sequential",
            "--downstream_eval_steps", "2", "--downstream_tasks", "sst2", "--number_of_few_shots", "2", "--number_of_tests", "4",
            "--generation_test_interval", "2", "--generation_prompts", "1", "--generation_tokens", "4", "--perplexity_tokens", "64",
            "--corpus", str(write_corpus(tmp_path)), "--data_dir", str(data), "--results_dir", str(tmp_path / "results"), *extra]


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3"])
def test_arch_evaluate_runs_end_to_end_on_a_tiny_folder_with_hparams_auto(model_type, tiny_folder, tmp_path, caches, hparams_dir, capsys):
    # python experiments/evaluate.py --alg_name R-ROME --model_name <folder> --hparams auto ... (README)
    folder = tiny_folder(model_type)
    assert evaluate_main(["--alg_name", "R-ROME", *evaluate_argv(folder, tmp_path, "--set", "v_num_grad_steps=5")]) == 0
    derived = hparams_dir / "R-ROME" / derive_hparams.model_hparams_file(str(folder))
    assert derived.read_text().startswith(derive_hparams.DERIVED)
    run = tmp_path / "results" / "R-ROME" / "run_001"
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["model_type"] == model_type and config["options"]["hparams_fname"] == str(derived)
    assert config["hparams"]["layers"] == [1] and config["hparams"]["v_loss_layer"] == 3
    assert summary["status"] == "complete" and summary["n_edits"] == 2
    assert "results:" in capsys.readouterr().out


def test_layer_sweep_from_derived_hparams(tiny_folder, caches, hparams_dir, shared_data, tmp_path):
    folder = str(tiny_folder("olmo2"))
    args = argparse.Namespace(alg_name="MEMIT", model_name=folder, hparams_fname="auto", layers=None, n_records=1, ds_name="cf",
                              data_dir=str(shared_data), corpus=str(write_corpus(tmp_path)), seed=0, set=["v_num_grad_steps=3"])
    rows = sweep(args)
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]  # the derived range is one layer wide on 4 layers
    assert all(0 <= row["ES"] <= 1 for row in rows)
