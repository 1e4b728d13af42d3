"""Target values kept on disk (rome/value_cache.py): read back only for the same weights, request,
templates and value hparams, equal to recomputed ones, and shared by the batch sizes of a batched run."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import rome.editor
from editors import ALGORITHMS
from emmet.emmet_main import EMMETHyperParams
from experiments.pipeline.run import run
from memit.memit_main import MEMITHyperParams
from rome.value_cache import ValueCache
from tests.conftest import fresh_llama
from tests.helpers import EXTRA, context, run_options, tiny_hparams
from util.deltas import restore
from util.files import read_jsonl
from util.requests import EditRequest


REQUESTS = [EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris", case_id=1),
            EditRequest("{} plays the", "Miles Davis", "violin", "trumpet", case_id=2),
            EditRequest("The capital of {} is", "France", "Berlin", "Paris", case_id=3)]


def memit_hparams(**overrides):
    return tiny_hparams(MEMITHyperParams, **{**EXTRA["MEMIT"], **overrides})


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """The number of requests each value optimisation is given."""
    calls, real = [], rome.editor.optimise_values
    monkeypatch.setattr(rome.editor, "optimise_values", lambda lm, batch, *a, **k: calls.append(batch.n_requests) or real(lm, batch, *a, **k))
    return calls


def edit(lm, requests, hparams, ctx, alg="MEMIT"):
    """Apply, undo, and return the edit's record (the model is left as it was)."""
    result = ALGORITHMS[alg].apply(lm, requests, hparams, ctx)
    restore(lm.model, result.originals)
    return result


def test_values_are_read_back_only_for_what_they_depend_on(tokenizer, tmp_path, counted):
    lm, hp = fresh_llama(tokenizer), memit_hparams()
    ctx = context(tmp_path, value_cache=True)
    first = edit(lm, REQUESTS[:2], hp, ctx)
    again = edit(lm, REQUESTS[:2], hp, ctx)
    assert counted == [2] and [r.get("v_cached") for r in again.requests] == [True, True]
    assert not any("v_cached" in r for r in first.requests)
    # the same deltas, and the same optimisation records, as computing them
    assert all(torch.equal(first.deltas[n], again.deltas[n]) for n in first.deltas)
    assert [dict(r, v_cached=None) for r in again.requests] == [dict(r, v_cached=None) for r in first.requests]
    # what only the solve reads (lambda, the statistics) leaves the values as they are
    edit(lm, REQUESTS[:2], dataclasses.replace(hp, mom2_update_weight=7.0, mom2_n_samples=6), ctx)
    assert counted == [2]
    # what the values read makes new ones: an hparam, another edited layer, other templates (seed)
    edit(lm, REQUESTS[:2], dataclasses.replace(hp, v_lr=0.3), ctx)
    edit(lm, REQUESTS[:2], dataclasses.replace(hp, layers=[1]), ctx)
    edit(lm, REQUESTS[:2], hp, context(tmp_path, value_cache=True, seed=1))
    assert counted == [2, 2, 2, 2]
    # other weights: any parameter, not only the edited ones; back to the first weights, read again
    weight = lm.model.get_parameter("model.layers.3.mlp.up_proj.weight")
    before = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    edit(lm, REQUESTS[:2], hp, ctx)
    with torch.no_grad():
        weight.copy_(before)
    edit(lm, REQUESTS[:2], hp, ctx)
    assert counted == [2, 2, 2, 2, 2]
    # without the cache nothing is read
    edit(lm, REQUESTS[:2], hp, context(tmp_path))
    assert counted == [2, 2, 2, 2, 2, 2]


def test_a_batch_optimises_only_its_new_requests_and_keeps_their_order(tokenizer, tmp_path, counted):
    lm, hp = fresh_llama(tokenizer), memit_hparams()
    ctx = context(tmp_path, value_cache=True)
    edit(lm, REQUESTS[1:2], hp, ctx)
    mixed = edit(lm, REQUESTS, hp, ctx)
    assert counted == [1, 2] and [r.get("v_cached", False) for r in mixed.requests] == [False, True, False]
    assert [r["case_id"] for r in mixed.requests] == [1, 2, 3]
    fresh = edit(lm, REQUESTS, hp, context(tmp_path))
    # values optimised in other batches: equal up to float rounding
    torch.testing.assert_close(mixed.value_deltas, fresh.value_deltas, rtol=1e-4, atol=1e-5)
    for name in fresh.deltas:
        torch.testing.assert_close(mixed.deltas[name], fresh.deltas[name], rtol=1e-3, atol=1e-5)


def test_a_torn_entry_is_optimised_again(tokenizer, tmp_path, counted):
    lm, hp = fresh_llama(tokenizer), memit_hparams()
    ctx = context(tmp_path, value_cache=True)
    first = edit(lm, REQUESTS[:1], hp, ctx)
    (entry,) = ctx.config.caches.values.rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    again = edit(lm, REQUESTS[:1], hp, ctx)
    assert counted == [1, 1] and "v_cached" not in again.requests[0]
    assert torch.equal(first.value_deltas, again.value_deltas)
    assert edit(lm, REQUESTS[:1], hp, ctx).requests[0]["v_cached"]  # rewritten whole


def test_an_interrupted_batch_keeps_the_chunks_it_finished(tokenizer, tmp_path, counted, monkeypatch):
    lm, hp = fresh_llama(tokenizer), memit_hparams()
    ctx = context(tmp_path, value_cache=True, value_chunk_size=2)
    real = rome.editor.optimise_values  # counting (the fixture's)

    def interrupted(lm, batch, *a, **k):
        if len(counted) == 1:
            raise KeyboardInterrupt  # what a SIGTERM raises (util.cli.Terminated)
        return real(lm, batch, *a, **k)
    monkeypatch.setattr(rome.editor, "optimise_values", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit(lm, REQUESTS, hp, ctx)
    monkeypatch.setattr(rome.editor, "optimise_values", real)  # counting again
    counted.clear()
    again = edit(lm, REQUESTS, hp, ctx)
    assert counted == [1] and [r.get("v_cached", False) for r in again.requests] == [True, True, False]
    whole = edit(lm, REQUESTS, hp, context(tmp_path, value_chunk_size=2))  # no cache: chunks of 2 as well
    assert torch.equal(again.value_deltas, whole.value_deltas)


def test_each_solvers_own_constant_is_left_out_of_the_key(tokenizer, tmp_path, counted):
    lm = fresh_llama(tokenizer)
    hp = tiny_hparams(EMMETHyperParams, **EXTRA["EMMET"])
    ctx = context(tmp_path, value_cache=True)
    edit(lm, REQUESTS[:2], hp, ctx, "EMMET")
    edit(lm, REQUESTS[:2], dataclasses.replace(hp, emmet_lambda=0.5), ctx, "EMMET")
    assert counted == [2]


def test_the_weights_digest_rehashes_only_changed_parameters(tokenizer, tmp_path, monkeypatch):
    lm, cache = fresh_llama(tokenizer), ValueCache(tmp_path)
    start = cache.weights_digest(lm.model)
    hashed = []
    real = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: hashed.append(self.numel()) or real(self, *a, **k))
    assert cache.weights_digest(lm.model) == start and not hashed
    weight = lm.model.get_parameter(lm.arch.weight_name(1))
    before = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2.0)
    changed = cache.weights_digest(lm.model)
    with torch.no_grad():
        weight.copy_(before)
    assert changed != start and cache.weights_digest(lm.model) == start
    assert hashed == [weight.numel() * weight.element_size()] * 2  # that matrix's bytes, twice, nothing else
    assert ValueCache(tmp_path).weights_digest(lm.model) == start  # as another process computes it
    lm.model.config.rope_theta = 500.0  # the same weights in another architecture
    assert cache.weights_digest(lm.model) != start


def test_a_batched_run_reads_the_values_of_another_batch_size(tokenizer, tmp_path):
    """The batch-size study's runs: the same facts batched by 2 and then by 4 optimise each value once."""
    base = dataclasses.replace(run_options(tmp_path), alg_name="MEMIT", sequential=False, dataset_size_limit=4,
                               downstream_eval_steps=4, generation_test_interval=0, value_cache=True)
    hp = memit_hparams()
    by_two = run(dataclasses.replace(base, num_edits=2), fresh_llama(tokenizer), hp)
    by_four = run(dataclasses.replace(base, num_edits=4), fresh_llama(tokenizer), hp)
    cached = lambda path: [r.get("v_cached", False) for e in read_jsonl(path / "edits.jsonl") for r in e["requests"]]  # noqa: E731
    assert cached(by_two) == [False] * 4 and cached(by_four) == [True] * 4
    assert json.loads((by_four / "config.json").read_text())["options"]["value_cache"] is True
    assert json.loads((by_four / "summary.json").read_text())["values_from_cache"] == 4
    assert "read from the value cache (--value_cache, optimised before on the same weights): 4 of 4 requests" in (by_four / "summary.md").read_text()
    assert json.loads((by_two / "summary.json").read_text())["values_from_cache"] == 0


def test_a_batch_of_several_chunks_is_optimised_and_logged_chunk_by_chunk(tokenizer, tmp_path, counted, caplog):
    """Without the cache as with it: the chunks optimise_values takes, equal to its values bitwise."""
    from rome.compute_v import optimise_values
    from rome.values.layout import build_batch

    lm, hp = fresh_llama(tokenizer), memit_hparams()
    ctx = context(tmp_path, value_chunk_size=2)
    with caplog.at_level("INFO", logger="rome.value_cache"):
        result = edit(lm, REQUESTS, hp, ctx)
    assert counted == [2, 1]
    assert "values: 2 of 3 requests optimised (chunk 1 of 2" in caplog.text and "chunk 2 of 2" in caplog.text
    whole = optimise_values(lm, build_batch(lm, REQUESTS, ctx.templates(lm, hp), hp), hp.layers[-1], hp, "layer",
                            ctx.config.value_settings(2), ctx.replay)
    assert torch.equal(result.value_deltas, whole.delta)
