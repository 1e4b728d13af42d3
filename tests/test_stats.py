import json

import numpy as np
import pytest
import torch

from util.corpus import local_corpus, resolve_corpus, token_windows
from util.environment import Environment
from util.errors import CorpusError
from util.stats import CPU_BATCH_TOKENS, StatsCache, accumulate_second_moments, batch_tokens_for


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    texts = [f"Article {i}. The river flows through the valley of town number {i}, and people live there." * 3 for i in range(40)]
    path.write_text("".join(json.dumps({"title": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def direct_second_moment(lm, layer, windows):
    """E[k k^T] from keys captured with a plain torch hook over the whole model, in numpy float64."""
    keys = []
    module = lm.model.get_submodule(lm.arch.down_proj(layer))
    handle = module.register_forward_hook(lambda m, args, out: keys.append(args[0].reshape(-1, args[0].shape[-1]).numpy().astype(np.float64)))
    with torch.no_grad():
        for window in windows:
            lm.model(window[None])
    handle.remove()
    k = np.concatenate(keys)
    return k.T @ k / len(k), len(k)


def test_second_moment_matches_numpy_and_is_cached(tiny, corpus_file, monkeypatch, caches):
    corpus = local_corpus(corpus_file, caches)
    cache = StatsCache(caches.stats)
    moments = cache.second_moments(tiny, [1, 2], corpus, n_samples=6, sample_tokens=32, batch_tokens=64, progress=False)
    windows = list(token_windows(corpus, tiny.tok, 32, 6))
    for layer in (1, 2):
        expected, count = direct_second_moment(tiny, layer, windows)
        got = moments[layer].mom2
        assert got.dtype == torch.float64 and moments[layer].count == count == 6 * 32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        torch.testing.assert_close(got, got.T, rtol=0, atol=0)
        # positive semi-definite up to the float32 rounding of the per-batch Gram matrices
        assert torch.linalg.eigvalsh(got).min() > -1e-6 * torch.linalg.eigvalsh(got).max()
        assert cache.path(moments[layer].key).is_file()

    # A fresh cache object loads from disk without running the model.
    monkeypatch.setattr("util.stats.accumulate_second_moments", lambda *a, **k: pytest.fail("recomputed"))
    again = StatsCache(caches.stats).second_moments(tiny, [2, 1], corpus, n_samples=6, sample_tokens=32, progress=False)
    torch.testing.assert_close(again[1].mom2, moments[1].mom2, rtol=0, atol=0)


def test_cache_key_includes_token_count_and_dtype(tiny_llama, corpus_file, caches):
    corpus = local_corpus(corpus_file, caches)
    cache = StatsCache(caches.stats)
    a = cache.second_moments(tiny_llama, [1], corpus, n_samples=2, sample_tokens=32, progress=False)[1]
    b = cache.second_moments(tiny_llama, [1], corpus, n_samples=3, sample_tokens=32, progress=False)[1]
    assert cache.path(a.key) != cache.path(b.key) and b.count == 96


def test_corpora_with_equal_names_and_sizes_but_other_text_have_other_keys(tmp_path, tiny_llama, caches):
    one, two = tmp_path / "one" / "wiki", tmp_path / "two" / "wiki"
    for folder, text in ((one, "The river flows north."), (two, "The river flows south.")):
        folder.mkdir(parents=True)
        (folder / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert (one / "a.jsonl").stat().st_size == (two / "a.jsonl").stat().st_size
    assert local_corpus(one, caches).ident != local_corpus(two, caches).ident
    assert local_corpus(one, caches).ident == local_corpus(one, caches).ident  # the second time from the hash cache
    assert len(list(caches.file_hashes.iterdir())) == 2  # one remembered hash per file, in the caches given
    cache = StatsCache(caches.stats)
    key = {c: cache.second_moments(tiny_llama, [1], local_corpus(c, caches), n_samples=1, sample_tokens=4, progress=False)[1].key
           for c in (one, two)}
    assert cache.path(key[one]) != cache.path(key[two])


def test_invalid_utf8_in_a_jsonl_corpus_reads_as_replacement_characters(tmp_path, caches):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    assert list(local_corpus(path, caches).texts()) == ["caf\ufffd au lait"]


def test_bad_corpus_paths(tmp_path, tiny_llama, caches):
    with pytest.raises(CorpusError, match="does not exist"):
        local_corpus(tmp_path / "missing", caches)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        local_corpus(tmp_path / "empty", caches)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not a JSON line"):
        list(local_corpus(bad, caches).texts())
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(CorpusError, match="ran out after 0 windows"):
        list(token_windows(local_corpus(short, caches), tiny_llama.tok, 64, 1))


def test_corpus_choice_order(tmp_path, corpus_file, tiny_llama, caches):
    env = Environment.read({"KEDIT_CORPUS": str(corpus_file)})  # what a command line passes on
    assert resolve_corpus(env.corpus, tiny_llama.model, tiny_llama.tok, "tiny", 100, caches=caches).kind == "local"
    sampled = resolve_corpus(None, tiny_llama.model, tiny_llama.tok, "tiny", 100, seed=3, offline=True, caches=caches)
    assert sampled.kind == "model-sampled"
    first = list(sampled.texts())
    assert len(first) >= 1 and all(isinstance(t, str) and t for t in first)
    # Cached and seeded: a second resolution reads the same texts.
    assert list(resolve_corpus(None, tiny_llama.model, tiny_llama.tok, "tiny", 100, seed=3, offline=True, caches=caches).texts()) == first


@pytest.mark.slow
def test_embedded_statistics_on_wikipedia_are_psd(embedded, shared_data, caches):
    corpus = local_corpus(shared_data / "wiki", caches)
    moment = StatsCache(caches.stats).second_moments(embedded, [4], corpus, n_samples=16, sample_tokens=256, progress=False)[4]
    eig = torch.linalg.eigvalsh(moment.mom2)
    assert moment.mom2.shape == (1536, 1536) and eig.min() > 0


def test_statistics_accumulate_on_the_device_and_batches_do_not_change_them(tiny_llama, corpus_file, monkeypatch, caches):
    """The float64 sums stay on the model's device, copied to the host once per layer at the end
    (not once per batch); one window per batch gives the sums of one batch of all windows."""
    windows = list(token_windows(local_corpus(corpus_file, caches), tiny_llama.tok, 32, 6))
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    many, count, _ = accumulate_second_moments(tiny_llama, [1, 2], iter(windows), 6, batch_size=1, progress=False)
    assert len(copies) == 2 and count == 6 * 32
    one, _, _ = accumulate_second_moments(tiny_llama, [1, 2], iter(windows), 6, batch_size=6, progress=False)
    for layer in (1, 2):
        assert many[layer].device.type == "cpu" and many[layer].dtype == torch.float64
        # float32 Gram matrices of other batches: equal up to float32 rounding, not bitwise
        torch.testing.assert_close(many[layer], one[layer], rtol=1e-5, atol=1e-6 * one[layer].abs().max().item())
    assert batch_tokens_for(tiny_llama, 2) == CPU_BATCH_TOKENS  # a fixed batch on the CPU


def eigh_calls(monkeypatch) -> list:
    """Counts torch.linalg.eigh calls (the real one runs): how the null space was obtained."""
    calls, real = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def test_null_space_is_cached_on_disk_with_the_statistics(tiny_llama, corpus_file, tmp_path, monkeypatch, caches):
    """AlphaEdit's basis U is stored next to C0 under C0's key plus the threshold: a second run (a
    fresh context and cache object on the same folder) loads it without an eigendecomposition; a
    changed threshold or layer is another key and is computed."""
    from alphaedit.alphaedit_main import AlphaEditHyperParams
    from rome.editor import EditContext
    from tests.helpers import tiny_hparams

    hp = tiny_hparams(AlphaEditHyperParams, layers=[1, 2], nullspace_threshold=1e-3)
    run = lambda: EditContext(caches, corpus_path=str(corpus_file), stats=StatsCache(tmp_path / "stats"))  # noqa: E731
    calls = eigh_calls(monkeypatch)
    first = run().nullspace(tiny_llama, 1, hp, 1e-3)
    assert len(calls) == 1 and first.shape[1] > 0
    assert sorted(p.name for p in (tmp_path / "stats").rglob("*__null*")) == [
        f"model.layers.1.mlp.down_proj__{local_corpus(corpus_file, caches).ident}__t512__float32__null0.001.safetensors"]
    second = run().nullspace(tiny_llama, 1, hp, 1e-3)
    assert len(calls) == 1, "the second run recomputed the null space"
    assert torch.equal(second, first)
    other = run()
    other.nullspace(tiny_llama, 1, hp, 2e-3)  # another threshold
    other.nullspace(tiny_llama, 2, hp, 1e-3)  # another layer
    assert len(calls) == 3
