"""Key statistics exported once and imported elsewhere, checked against the model they are used with."""
import json

import pytest
import torch

from tests.conftest import tiny_gpt2_model, tiny_llama_model
from tests.helpers import write_corpus
from util.arch import arch_for
from util.corpus import Corpus, local_corpus
from util.models import LoadedModel
from util.solve import nullspace_basis
from util.stats import StatsCache
from util.stats_share import MANIFEST, TENSORS, StatsShareError, export_stats, import_stats

LAYERS, SAMPLES, TOKENS = [1, 2], 8, 64


def model(tokenizer, build=tiny_llama_model, seed=0, dtype=torch.float32, name="tiny-llama") -> LoadedModel:
    m = build(len(tokenizer), seed=seed).to(dtype)
    return LoadedModel(m, tokenizer, arch_for(m), name)


@pytest.fixture
def exported(tokenizer, tmp_path, caches):
    lm, corpus = model(tokenizer), local_corpus(write_corpus(tmp_path), caches)
    cache = StatsCache(tmp_path / "exporter")
    out = export_stats(lm, LAYERS, corpus, SAMPLES, TOKENS, "float32", tmp_path / "shared", cache, nullspace_threshold=1e-3)
    moments = cache.second_moments(lm, LAYERS, corpus, SAMPLES, TOKENS)
    return out, corpus, {layer: m.mom2 for layer, m in moments.items()}


def unreadable(ident: str) -> Corpus:
    """A corpus with the exported one's ident whose text cannot be read: a cache miss would fail."""
    def texts():
        raise AssertionError("the statistics were recomputed instead of read from the cache")
    return Corpus("local", ident, texts)


def test_export_then_import_serves_a_run_without_the_corpus(exported, tokenizer, tmp_path, monkeypatch):
    folder, corpus, expected = exported
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["n_tokens"] == SAMPLES * TOKENS and manifest["corpus"] == corpus.ident and manifest["dtype"] == "float32"
    assert [e["module"] for e in manifest["layers"]] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    # Imported under another name and into another cache, with the model loaded in float64: the
    # fingerprint is of the weights' values, not their names or dtype.
    user = model(tokenizer, dtype=torch.float64, name="/elsewhere/tiny")
    cache = StatsCache(tmp_path / "importer")
    keys = import_stats(user, folder, cache)
    assert [k.model for k in keys] == ["/elsewhere/tiny"] * 2
    got = StatsCache(tmp_path / "importer").second_moments(user, LAYERS, unreadable(corpus.ident), SAMPLES, TOKENS, progress=False)
    for layer in LAYERS:
        assert torch.equal(got[layer].mom2, expected[layer])
    # AlphaEdit's projection travels too: the basis of C0's eigenvalues below the threshold
    from safetensors.torch import load_file
    basis = load_file(str(folder / TENSORS))["layer.1.nullspace"]
    torch.testing.assert_close(basis @ basis.T, (lambda u: u @ u.T)(nullspace_basis(expected[1], 1e-3)))
    assert manifest["layers"][0]["nullspace"]["rank"] == basis.shape[1] > 0
    # and is imported into the cache: a run with that threshold loads it (no eigendecomposition)
    calls, real = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(StatsCache(tmp_path / "importer").nullspace(got[1], 1e-3, "cpu"), basis) and not calls


@pytest.mark.parametrize("case, fragment", [
    ("other weights", "with other weights"),
    ("other architecture", "statistics of a llama model"),
    ("corrupted", "missing or corrupted"),
    ("no manifest", "does not exist: not an exported statistics folder"),
    ("later layer edited", None),
])
def test_import_checks_the_manifest_against_the_model(exported, tokenizer, tmp_path, case, fragment):
    folder = exported[0]
    user = model(tokenizer)
    if case == "other weights":
        user = model(tokenizer, seed=1)
    elif case == "other architecture":
        user = model(tokenizer, build=tiny_gpt2_model)
    elif case == "corrupted":
        data = bytearray((folder / TENSORS).read_bytes())
        data[-1] ^= 1
        (folder / TENSORS).write_bytes(bytes(data))
    elif case == "no manifest":
        (folder / MANIFEST).unlink()
    else:  # layer 3 is after the deepest exported layer: keys at layers 1-2 do not depend on it
        with torch.no_grad():
            user.model.get_parameter(user.arch.weight_name(3)).add_(1.0)
    if fragment is None:
        assert len(import_stats(user, folder, StatsCache(tmp_path / "c"))) == 2
        return
    with pytest.raises(StatsShareError) as err:
        import_stats(user, folder, StatsCache(tmp_path / "c"))
    assert fragment in str(err.value) and "\n" not in str(err.value)
