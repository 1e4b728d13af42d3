import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from util.arch import ARCHITECTURES, arch_for, edited_weight, to_stored
from util.errors import ModelLoadError
from util.models import load_model, random_config, shape_model
from util.paths import PROJECT_ROOT


def test_architecture_table_resolves_by_model_type(tiny_gpt2, tiny_llama):
    assert tiny_gpt2.arch.transposed and not tiny_llama.arch.transposed
    for lm in (tiny_gpt2, tiny_llama):
        weight = edited_weight(lm.model, lm.arch, 0)
        assert weight.shape == (lm.model.config.hidden_size, lm.model.get_submodule(lm.arch.down_proj(0)).weight.numel() // lm.model.config.hidden_size)
        delta = torch.zeros_like(weight)
        assert to_stored(lm.arch, delta).shape == lm.model.get_parameter(lm.arch.weight_name(0)).shape
    assert {"gpt2", "gptj", "llama", "mistral", "qwen2"} <= set(ARCHITECTURES)


def test_unknown_model_type_is_one_line(tiny_llama):
    tiny_llama.model.config.model_type = "mamba"
    with pytest.raises(ModelLoadError, match="model_type 'mamba' is not in the architecture table"):
        arch_for(tiny_llama.model)


@pytest.mark.parametrize("name, fragment", [
    ("./no/such/folder", "does not exist"),
    ("smollm2-135m", "unknown dtype"),
])
def test_bad_model_arguments(name, fragment, caches):
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(name, dtype="float8" if name == "smollm2-135m" else "float32", model_cache=caches.models)


@pytest.mark.parametrize("load", [load_model, shape_model])
def test_unknown_hub_name_offline_is_one_line(monkeypatch, caches, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load("no-such-org/no-such-model", model_cache=caches.models)
    assert "unknown model 'no-such-org/no-such-model'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_folder_with_its_own_code_is_refused_without_running_it(tmp_path):
    """Asked on stdin whether to run a folder's code, a piped "y" must not make it run."""
    folder = tmp_path / "custom_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "customnet", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    code = ("import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('yes')\n"
            "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n    model_type = 'customnet'\n")
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(code)
    script = ("from util.cli import run_cli\nfrom util.environment import Environment\nfrom util.models import load_model\n"
              f"run_cli(lambda: load_model({str(folder)!r}, model_cache=Environment.read().caches.models))\n")
    result = subprocess.run([sys.executable, "-c", script], input="y\ny\n", capture_output=True, text=True, timeout=300,
                            cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert not (folder / "CODE_RAN").exists()
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "trust_remote_code=False" in result.stderr, result.stderr


@pytest.mark.slow
def test_embedded_model_completes_paris(embedded):
    ids = embedded.tok("The capital of France is", return_tensors="pt").input_ids
    out = embedded.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=embedded.tok.pad_token_id)
    assert embedded.tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    assert embedded.model.dtype == torch.float32 and embedded.arch.down_proj(3) == "model.layers.3.mlp.down_proj"


def test_a_cuda_load_places_the_weights_on_the_device_while_loading(tiny_llama, tmp_path, monkeypatch, caches):
    """device="cuda" asks from_pretrained for a device map (weights read straight onto the GPU),
    never a host load followed by .to("cuda"). Without a GPU the recorded request is checked and
    the load itself is carried out on the CPU."""
    import transformers

    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tok.save_pretrained(tmp_path / "m")
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    asked, moved = [], []

    def recording(cls, source, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real(cls, source, **{**kwargs, "device_map": {"": "cpu"}})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append((a, k)) or real_to(self, *a, **k))
    lm = load_model(str(tmp_path / "m"), device="cuda", model_cache=caches.models)
    assert asked == [{"": "cuda"}] and moved == []
    assert lm.arch.down_proj(0) == "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(edited_weight(lm.model, lm.arch, 1), edited_weight(tiny_llama.model, tiny_llama.arch, 1), rtol=0, atol=0)


def test_random_models_by_shape_name(caches):
    lm = load_model("random:tiny", dtype="float64", model_cache=caches.models)
    assert lm.model.config.model_type == "llama" and lm.model.config.num_hidden_layers == 4
    assert lm.model.dtype == torch.float64 and lm.model.config.vocab_size == len(lm.tok) == 49152
    again = load_model("random:tiny", dtype="float64", model_cache=caches.models)
    assert torch.equal(edited_weight(lm.model, lm.arch, 2), edited_weight(again.model, again.arch, 2)), "seeded"
    with pytest.raises(ModelLoadError, match="unknown random model shape 'llama-9'"):
        load_model("random:llama-9", model_cache=caches.models)


def test_random_models_need_only_the_embedded_tokenizer_files(tmp_path, tokenizer):
    # A GPU box without the embedded model's package: the tokenizer files alone, no dequantising.
    from tests.conftest import MODEL_CACHE

    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_CACHE / "smollm2-135m" / name, folder / name)
    lm = load_model("random:tiny", model_cache=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert lm.tok("The Eiffel Tower")["input_ids"] == tokenizer("The Eiffel Tower")["input_ids"]
    assert lm.tok.pad_token == tokenizer.pad_token


def test_the_llama_3_8b_shape_has_its_parameter_count(tokenizer):
    """random:llama-3-8b built on 'meta' (no memory): Llama-3-8B's 8.03 B parameters less the
    embedding and unembedding rows of the vocabulary it does not have (128256 -> 49152)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("random:llama-3-8b", tokenizer))
    expected = 8_030_261_248 - 2 * (128_256 - 49_152) * 4096
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.get_parameter("model.layers.31.mlp.down_proj.weight").shape == (4096, 14336)
