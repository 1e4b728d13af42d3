"""A model already in the value dtype (bfloat16 weights, bfloat16 values) replays its own upper
modules: no copy of them, the same float32 attention as the copies had, and the model's config
left as it was (rome/values/replay.py's UpperModules)."""
from __future__ import annotations

import pytest
import torch

import rome.values.replay as replay
import rome.values.stacks as stacks
from rome.compute_v import ValueSettings, compute_values
from rome.values.layout import View, build_batch
from rome.editor import EditContext
from tests.helpers import REQUESTS, tiny_hparams
from util.requests import make_request

REQS = [make_request(r) for r in REQUESTS]


def every_matrix(modules, autocast):
    """73d7405's rule, to force the copy: every matrix of the modules, whatever its dtype."""
    return [p for module in modules for p in module.parameters() if p.dim() >= 2]


def attention_implementations(model: torch.nn.Module) -> list:
    return [model.config._attn_implementation] + [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def logits(lm) -> torch.Tensor:
    return lm.model(input_ids=lm.tok("The Eiffel Tower is in", return_tensors="pt")["input_ids"]).logits


def bf16_values(lm, caches, **overrides):
    hp = tiny_hparams(v_num_grad_steps=6, **overrides)
    return compute_values(lm, REQS, 1, EditContext(caches).templates(lm, hp), hp, settings=ValueSettings(autocast=torch.bfloat16))


def test_a_model_in_the_value_dtype_replays_its_own_modules_with_the_copies_numbers(tiny, monkeypatch, caches):
    tiny.model.to(torch.bfloat16)
    upper = stacks.UpperModules(tiny, 1, 3, torch.bfloat16)
    model_storage = {p.data_ptr() for p in tiny.model.parameters()}
    assert upper.mixed and not upper.copied
    assert all(a is b for a, b in zip(upper.layers, upper.originals)) and len(upper.layers) == 2
    assert upper.unembed is tiny.model.get_submodule(tiny.arch.unembed) and upper.norm is tiny.model.get_submodule(tiny.arch.final_norm)
    assert {p.data_ptr() for m in (*upper.layers, upper.norm, upper.unembed) for p in m.parameters()} <= model_storage
    own = bf16_values(tiny, caches)
    # the same numbers as the copies of 73d7405 (every matrix copied, the copies' attention float32)
    monkeypatch.setattr(stacks, "matrices_to_copy", every_matrix)
    forced = stacks.UpperModules(tiny, 1, 3, torch.bfloat16)
    assert forced.copied and not {p.data_ptr() for m in forced.layers for p in m.parameters()} & model_storage
    copied = bf16_values(tiny, caches)
    assert torch.equal(own.delta, copied.delta) and own.final_loss == copied.final_loss and own.steps == copied.steps
    # ... which depend on the float32 attention: with the model's sdpa they differ
    monkeypatch.setattr(replay.ReplayRuntime, "float32_attention", lambda self: "sdpa")
    assert not torch.equal(bf16_values(tiny, caches).delta, own.delta)


def test_the_model_keeps_its_attention_after_a_replay_and_when_it_raises(tiny, caches):
    tiny.model.to(torch.bfloat16)
    before, reference = attention_implementations(tiny.model), logits(tiny)
    assert set(before) == {"sdpa"}
    bf16_values(tiny, caches)
    assert attention_implementations(tiny.model) == before and torch.equal(logits(tiny), reference)
    # the top layer sees the model's sdpa in the unedited forwards, float32_sdpa in the replay only
    hp = tiny_hparams()
    batch = build_batch(tiny, REQS, EditContext(caches).templates(tiny, hp), hp)
    top, seen, fail = tiny.model.get_submodule(tiny.arch.layer(3)), [], []

    def record(module, args, kwargs):
        seen.append({m.config._attn_implementation for m in module.modules() if hasattr(m, "config")})
        if fail:
            raise RuntimeError("a replay failing mid-call")

    handle = top.register_forward_pre_hook(record, with_kwargs=True)
    runtime = replay.ReplayRuntime()
    try:
        stacked = replay.make_replay(tiny, batch, 1, 3, runtime=runtime, autocast=torch.bfloat16)
        assert isinstance(stacked, replay.ModuleReplay) and seen and all(s == {"sdpa"} for s in seen)
        seen.clear()
        fail.append(True)
        with pytest.raises(RuntimeError, match="failing mid-call"):
            stacked(torch.zeros(len(REQS), tiny.model.config.hidden_size), View(batch, list(range(len(REQS)))))
    finally:
        handle.remove()
        runtime.close()
    assert seen == [{replay.FLOAT32_SDPA}]
    assert attention_implementations(tiny.model) == before and torch.equal(logits(tiny), reference)
