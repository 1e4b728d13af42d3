import pytest
import torch

import rome.values.layout as batch_layout
import rome.values.llama_layer as llama_layer
import rome.values.replay as replay
from rome.compute_v import ValueSettings, compute_values
from rome.editor import EditContext
from tests.helpers import REQUESTS, context, tiny_hparams
from util.requests import make_request


def assert_same_values(a, b):
    """v* = reference + delta agree to 1e-4 relative (per request, in norm)."""
    err = (a.target - b.target).norm(dim=-1) / b.target.norm(dim=-1)
    assert err.max().item() < 1e-4, err


BF16 = ValueSettings(autocast=torch.bfloat16)


def requests():
    return [make_request(r) for r in REQUESTS]


# layers=[3]: the edited layer is the loss layer, so the delta reaches only its own position's
# logits; with the fact token at the prompt's end those predict the target (at the subject, the
# loss would be flat at delta = 0 and both paths would only follow rounding noise).
@pytest.mark.parametrize("kw", [dict(), dict(fact_token="last"), dict(layers=[3], fact_token="last")])
def test_fast_path_equals_straightforward_path(tiny, kw, caches):
    hp = tiny_hparams(v_num_grad_steps=6, **kw)
    templates = EditContext(caches).templates(tiny, hp)
    fast = compute_values(tiny, requests(), hp.layers[0], templates, hp)
    slow = compute_values(tiny, requests(), hp.layers[0], templates, hp, settings=ValueSettings(fast=False))
    assert_same_values(fast, slow)
    assert fast.steps == slow.steps
    torch.testing.assert_close(torch.tensor(fast.final_loss), torch.tensor(slow.final_loss), rtol=1e-4, atol=1e-5)


def test_batched_equals_separate_and_early_stop_leaves_batch(tiny, caches):
    # float64: rows padded differently must give the same values, not just close ones. A loose
    # threshold makes some requests stop early while others continue.
    tiny.model.double()
    threshold = {"gpt2": 10.83, "llama": 10.74}[tiny.model.config.model_type]  # between the requests' losses
    hp = tiny_hparams(v_num_grad_steps=10, v_weight_decay=0.0, v_loss_threshold=threshold)
    templates = EditContext(caches).templates(tiny, hp)
    together = compute_values(tiny, requests(), 1, templates, hp)
    for i, request in enumerate(requests()):
        alone = compute_values(tiny, [request], 1, templates, hp)
        err = (together.target[i] - alone.target[0]).norm() / alone.target[0].norm()
        assert err < 1e-4
        assert together.steps[i] == alone.steps[0]
    assert len(set(together.steps)) > 1, "the threshold should stop requests at different steps"


@pytest.mark.parametrize("rebuild_fraction", [0.0, 1.0])
def test_finished_requests_kept_in_the_replay_stack_do_not_change_the_others(tiny, monkeypatch, rebuild_fraction, caches):
    # 0.0: finished requests stay in the stack to the end; 1.0: the stack is rebuilt at every stop.
    tiny.model.double()
    threshold = {"gpt2": 10.83, "llama": 10.74}[tiny.model.config.model_type]
    hp = tiny_hparams(v_num_grad_steps=10, v_weight_decay=0.0, v_loss_threshold=threshold)
    templates = EditContext(caches).templates(tiny, hp)
    slow = compute_values(tiny, requests(), 1, templates, hp, settings=ValueSettings(fast=False))
    monkeypatch.setattr(replay, "REBUILD_FRACTION", rebuild_fraction)
    fast = compute_values(tiny, requests(), 1, templates, hp)
    assert_same_values(fast, slow)
    assert fast.steps == slow.steps and len(set(fast.steps)) > 1


@pytest.mark.parametrize("overhead", [0, 10**9])
def test_rows_grouped_by_length_give_the_values_of_one_group(tiny, monkeypatch, overhead, caches):
    # 0: every distinct suffix length its own group; 10**9: one group padded to the longest.
    tiny.model.double()
    hp = tiny_hparams(v_num_grad_steps=4)
    templates = EditContext(caches).templates(tiny, hp)
    slow = compute_values(tiny, requests(), 1, templates, hp, settings=ValueSettings(fast=False))
    monkeypatch.setattr(batch_layout, "GROUP_OVERHEAD_TOKENS", overhead)
    batch = batch_layout.build_batch(tiny, requests(), templates, hp)
    stack = replay.make_replay(tiny, batch, 1, hp.v_loss_layer, runtime=replay.ReplayRuntime()).stack
    distinct = len(set((batch.mask.sum(1) - batch.fact_position).tolist()))
    assert distinct > 1 and len(stack.groups) == (distinct if overhead == 0 else 1)
    assert_same_values(compute_values(tiny, requests(), 1, templates, hp), slow)


def brute_force_grouping_cost(lengths, overhead):
    """Least cost over every split of the sorted distinct lengths into runs (2^(d-1) splits)."""
    distinct = sorted(set(lengths))
    best = float("inf")
    for mask in range(2 ** (len(distinct) - 1)):
        cost, rows = 0, 0
        for j, d in enumerate(distinct):
            rows += lengths.count(d)
            if j == len(distinct) - 1 or mask >> j & 1:
                cost, rows = cost + rows * d + overhead, 0
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_partition_rows_at_least_cost(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator).tolist()
    for overhead in (0, 5, 30, 1000):
        groups = batch_layout.length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
        assert cost == brute_force_grouping_cost(lengths, overhead)
    assert len(batch_layout.length_groups(lengths, 0)) == len(set(lengths))


def test_chunked_batches_equal_one_batch(tiny, caches):
    from rome.compute_u import compute_keys

    tiny.model.double()
    hp = tiny_hparams(v_num_grad_steps=4)
    templates = EditContext(caches).templates(tiny, hp)
    whole = compute_values(tiny, requests(), 1, templates, hp)
    chunked = compute_values(tiny, requests(), 1, templates, hp, settings=ValueSettings(chunk_size=2))
    assert_same_values(chunked, whole)
    assert chunked.steps == whole.steps
    groups = [1, len(templates) - 1]  # MEMIT's template groups
    keys = compute_keys(tiny, requests(), [1, 2], templates, hp.fact_token, site=tiny.arch.layer(2), groups=groups)
    keys_chunked = compute_keys(tiny, requests(), [1, 2], templates, hp.fact_token, site=tiny.arch.layer(2), chunk_size=1, groups=groups)
    for layer in (1, 2):
        torch.testing.assert_close(keys_chunked.k_star[layer], keys.k_star[layer], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(keys_chunked.site_output, keys.site_output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(keys_chunked.site_mean, keys.site_mean, rtol=1e-10, atol=1e-12)


def test_bfloat16_value_optimisation_reaches_the_same_loss(tiny, caches):
    hp = tiny_hparams(v_num_grad_steps=6)
    templates = EditContext(caches).templates(tiny, hp)
    full = compute_values(tiny, requests(), 1, templates, hp)
    mixed = compute_values(tiny, requests(), 1, templates, hp, settings=BF16)
    assert mixed.delta.dtype == torch.float32 and torch.isfinite(mixed.delta).all()
    torch.testing.assert_close(torch.tensor(mixed.final_loss), torch.tensor(full.final_loss), rtol=1e-2, atol=0)
    assert mixed.steps == full.steps
    # The replay ran on bfloat16 copies (attention in float32); the model itself is untouched.
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert tiny.model.config._attn_implementation != replay.FLOAT32_SDPA


def test_float32_sdpa_keeps_grouped_heads_and_equals_transformers():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 8, generator=generator).bfloat16()
    key, value = (torch.randn(2, 2, 5, 8, generator=generator).bfloat16() for _ in range(2))
    mask = torch.zeros(2, 1, 3, 5)
    mask[0, :, :, 0] = mask[1, :, 0, 3:] = float("-inf")  # padding and causality
    ours, _ = llama_layer.float32_sdpa(Attention(), query, key, value, mask, dropout=0.0, scaling=0.3)
    theirs, _ = sdpa_attention_forward(Attention(), query.float(), key.float(), value.float(), mask, dropout=0.0, scaling=0.3)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 4, 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def _mixed_values(lm, caches, compiled=False):
    hp = tiny_hparams(v_num_grad_steps=6)
    templates = EditContext(caches).templates(lm, hp)
    return compute_values(lm, requests(), 1, templates, hp, settings=ValueSettings(autocast=torch.bfloat16, compiled=compiled))


def test_llama_layer_function_replays_exactly_what_transformers_layers_compute(tiny_llama, monkeypatch, caches):
    calls = []
    layer_function = llama_layer.llama_layer
    monkeypatch.setattr(llama_layer, "llama_layer", lambda *args: calls.append(1) or layer_function(*args))
    ours = _mixed_values(tiny_llama, caches)
    assert calls, "the Llama replay did not use _llama_layer"
    monkeypatch.setattr(llama_layer, "is_plain_llama", lambda layer: False)
    theirs = _mixed_values(tiny_llama, caches)  # transformers' modules with their cache and _float32_sdpa
    assert torch.equal(ours.delta, theirs.delta) and ours.final_loss == theirs.final_loss and ours.steps == theirs.steps


def test_float32_values_replay_the_function_only_to_compile_it(tiny_llama, monkeypatch, caches):
    # --value_compile with float32 values: the Llama layer function on the model's own weights,
    # equal to the modules to the bit uncompiled (here the runtime hands out the plain function).
    hp = tiny_hparams(v_num_grad_steps=6)
    templates = EditContext(caches).templates(tiny_llama, hp)
    batch = batch_layout.build_batch(tiny_llama, requests(), templates, hp)
    runtime = replay.ReplayRuntime()
    assert isinstance(replay.make_replay(tiny_llama, batch, 1, hp.v_loss_layer, runtime=runtime), replay.ModuleReplay)
    monkeypatch.setattr(replay.ReplayRuntime, "layer_function", lambda self, compiled: llama_layer.llama_layer)
    functional = replay.make_replay(tiny_llama, batch, 1, hp.v_loss_layer, runtime=runtime, compiled=True)
    assert isinstance(functional, replay.LlamaReplay) and not functional.upper.copied
    theirs = compute_values(tiny_llama, requests(), 1, templates, hp, settings=ValueSettings())
    ours = compute_values(tiny_llama, requests(), 1, templates, hp, settings=ValueSettings(compiled=True))
    assert torch.equal(ours.delta, theirs.delta) and ours.final_loss == theirs.final_loss and ours.steps == theirs.steps


def test_unpadded_length_group_replays_as_the_modules_do(tiny_llama, monkeypatch, caches):
    # Every distinct suffix length its own group: one request's groups hold one row each, which
    # transformers runs without a mask (plain causal); the function builds that mask itself.
    monkeypatch.setattr(batch_layout, "GROUP_OVERHEAD_TOKENS", 0)
    masks, mask_of = [], replay.LlamaStack._mask
    monkeypatch.setattr(replay.LlamaStack, "_mask", staticmethod(lambda mask, aligned: masks.append(mask) or mask_of(mask, aligned)))
    hp = tiny_hparams(v_num_grad_steps=6)
    templates = EditContext(caches).templates(tiny_llama, hp)
    one = requests()[:1]
    ours = compute_values(tiny_llama, one, 1, templates, hp, settings=BF16)
    assert any(mask is None for mask in masks) and any(mask is not None for mask in masks)
    monkeypatch.setattr(llama_layer, "is_plain_llama", lambda layer: False)
    theirs = compute_values(tiny_llama, one, 1, templates, hp, settings=BF16)
    assert torch.equal(ours.delta, theirs.delta) and ours.final_loss == theirs.final_loss


def test_narrowed_replay_stack_computes_its_rows_as_the_whole_stack_did(tiny_llama, monkeypatch, caches):
    hp = tiny_hparams(v_num_grad_steps=10, v_weight_decay=0.0)
    templates = EditContext(caches).templates(tiny_llama, hp)
    batch = batch_layout.build_batch(tiny_llama, requests(), templates, hp)
    rows = torch.arange(len(batch.ids))
    functional = replay.make_replay(tiny_llama, batch, 1, hp.v_loss_layer, runtime=replay.ReplayRuntime(), autocast=torch.bfloat16)
    stack = functional.stack
    kept = rows[batch.row_owner != 1]  # one request finished: rows leave both length groups
    narrow = stack.narrowed(kept)
    assert isinstance(functional, replay.LlamaReplay) and len(narrow.groups) == len(stack.groups) > 1
    assert sum(map(len, narrow.groups)) == len(kept) < sum(map(len, stack.groups))
    delta = torch.randn(len(rows), tiny_llama.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    last = batch.mask.sum(1) - 1
    whole = stack(delta, stack.reads(rows, last, delta.device))
    local = torch.arange(len(kept))
    assert torch.equal(narrow(delta[kept], narrow.reads(local, last[kept], delta.device)), whole[kept])
    fresh = functional.build(kept)
    torch.testing.assert_close(fresh(delta[kept], fresh.reads(local, last[kept], delta.device)), whole[kept])
    # In compute_values: requests stopping early leave by narrowing (the function) or by rebuilding (the modules).
    hp = tiny_hparams(v_num_grad_steps=10, v_weight_decay=0.0, v_loss_threshold=10.75)
    narrowed = compute_values(tiny_llama, requests(), 1, templates, hp, settings=BF16)
    monkeypatch.setattr(llama_layer, "is_plain_llama", lambda layer: False)
    monkeypatch.setattr(replay, "REBUILD_FRACTION", 1.0)
    rebuilt = compute_values(tiny_llama, requests(), 1, templates, hp, settings=BF16)
    assert narrowed.steps == rebuilt.steps and len(set(narrowed.steps)) > 1
    torch.testing.assert_close(torch.tensor(narrowed.final_loss), torch.tensor(rebuilt.final_loss), rtol=1e-4, atol=0)


@pytest.mark.slow  # torch.compile: ~1 min
def test_compiled_llama_layers_reach_the_same_loss(tiny_llama, caches):
    eager, compiled = _mixed_values(tiny_llama, caches), _mixed_values(tiny_llama, caches, compiled=True)
    # fused kernels round differently in bfloat16: close, not equal
    torch.testing.assert_close(torch.tensor(compiled.final_loss), torch.tensor(eager.final_loss), rtol=1e-2, atol=0)
    assert compiled.steps == eager.steps
    # and in float32, where the function runs on the model's own weights
    hp = tiny_hparams(v_num_grad_steps=6)
    templates = EditContext(caches).templates(tiny_llama, hp)
    eager, compiled = (compute_values(tiny_llama, requests(), 1, templates, hp, settings=ValueSettings(compiled=flag)) for flag in (False, True))
    torch.testing.assert_close(compiled.delta, eager.delta, rtol=1e-4, atol=1e-5)
    assert compiled.steps == eager.steps


def test_replay_runtime_owns_the_compiled_function_and_the_attention_it_registers(tiny_gpt2, caches):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hp = tiny_hparams(v_num_grad_steps=2)
    templates = EditContext(caches).templates(tiny_gpt2, hp)
    runtime = replay.ReplayRuntime()
    assert replay.FLOAT32_SDPA not in ALL_ATTENTION_FUNCTIONS  # nothing registered by creating it
    # GPT-2 under mixed precision: module copies whose attention is float32_sdpa, by name
    compute_values(tiny_gpt2, requests(), 1, templates, hp, settings=BF16, runtime=runtime)
    assert ALL_ATTENTION_FUNCTIONS[replay.FLOAT32_SDPA] is llama_layer.float32_sdpa
    runtime.close()
    assert replay.FLOAT32_SDPA not in ALL_ATTENTION_FUNCTIONS
    compute_values(tiny_gpt2, requests(), 1, templates, hp, settings=BF16)  # a runtime of its own, closed
    assert replay.FLOAT32_SDPA not in ALL_ATTENTION_FUNCTIONS
    # torch.compile's wrapper: once per runtime, none shared through the process
    assert runtime.layer_function(True) is runtime.layer_function(True) is not replay.ReplayRuntime().layer_function(True)
    assert runtime.layer_function(False) is llama_layer.llama_layer


def test_an_edit_context_closes_its_replay_runtime(tiny_gpt2, tmp_path, monkeypatch):
    """EditContext.close (and leaving its `with` block) takes float32_sdpa out of transformers'
    attention functions; editors.edit closes the context it makes, not one it is given."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import editors

    hp = tiny_hparams(v_num_grad_steps=2)
    with context(tmp_path, value_dtype="bfloat16") as ctx:
        editors.edit(tiny_gpt2.model, tiny_gpt2.tok, REQUESTS[:1], hp, context=ctx)  # GPT-2 modules under mixed precision
        assert ALL_ATTENTION_FUNCTIONS[replay.FLOAT32_SDPA] is llama_layer.float32_sdpa  # a given context stays open
    assert replay.FLOAT32_SDPA not in ALL_ATTENTION_FUNCTIONS
    closed, close = [], EditContext.close
    monkeypatch.setattr(EditContext, "close", lambda ctx: closed.append(ctx) or close(ctx))
    monkeypatch.setattr(editors, "new_context", lambda max_gpu_memory=None: context(tmp_path))  # its corpus, not the environment's
    editors.edit(tiny_gpt2.model, tiny_gpt2.tok, REQUESTS[1:2], hp)
    assert len(closed) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_adam_is_torch_adam_per_request_with_stopped_requests_frozen(dtype):
    # One Adam per request's delta (torch's, skipping a parameter without gradient) against RowAdam
    # on the rows of one matrix, requests stopping at steps 2, 4 and never: equal to the bit.
    from rome.values.adam import RowAdam

    generator = torch.Generator().manual_seed(0)
    n, d, lr, stops = 3, 17, 0.3, [2, 4, 99]
    separate = [torch.nn.Parameter(torch.zeros(d, dtype=dtype)) for _ in range(n)]
    optimizer = torch.optim.Adam(separate, lr=lr)
    values = torch.zeros(n, d, dtype=dtype)
    rows_adam = RowAdam(values, lr)
    for step in range(6):
        grad = torch.randn(n, d, generator=generator, dtype=dtype)
        live = torch.tensor([step < s for s in stops])
        for i, p in enumerate(separate):
            p.grad = grad[i].clone() if live[i] else None
        optimizer.step()
        rows = torch.arange(n)
        values[rows] = torch.where(live[:, None], rows_adam.step(rows, values[rows], grad, live, step + 1), values[rows])
        assert torch.equal(values, torch.stack([p.detach() for p in separate])), step


@pytest.mark.parametrize("argmax_stop", [0, 2])
def test_values_do_not_depend_on_how_often_the_host_reads_the_stopping_state(tiny, argmax_stop, caches):
    # Requests stop at different steps; the host learns it every step, every third, or only at the
    # end (stopped rows then stay in the replay, frozen): the same values and step counts.
    tiny.model.double()
    threshold = {"gpt2": 10.83, "llama": 10.74}[tiny.model.config.model_type]
    hp = tiny_hparams(v_num_grad_steps=10, v_weight_decay=0.0, v_loss_threshold=threshold, v_argmax_stop_steps=argmax_stop)
    templates = EditContext(caches).templates(tiny, hp)
    every = compute_values(tiny, requests(), 1, templates, hp, settings=ValueSettings(sync_every=1))
    assert len(set(every.steps)) > 1, "the threshold should stop requests at different steps"
    for sync_every in (3, 100):
        other = compute_values(tiny, requests(), 1, templates, hp, settings=ValueSettings(sync_every=sync_every))
        assert other.steps == every.steps
        torch.testing.assert_close(other.delta, every.delta, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.tensor(other.final_loss), torch.tensor(every.final_loss), rtol=1e-12, atol=0)


TRUES = ("basketball", "French", "Paris")


def true_probability(lm, request, templates, layer, delta=None) -> float:
    """Mean over the templated prompts of P(target_true) = exp(-mean token NLL), one plain forward
    per prompt, `delta` added to the layer's output at the prompt's fact token (the subject's last)."""
    from rome.compute_u import templated_prompts
    from util.nethook import Trace, add_to_output
    from util.tokens import encode_with_target, subject_position

    probs = []
    for prompt in templated_prompts(request, templates):
        full, start = encode_with_target(lm.tok, prompt.format(request.subject), request.target_true)
        _, fact = subject_position(lm.tok, prompt, request.subject, "subject_last")

        def added(hidden):
            out = torch.zeros_like(hidden)
            if delta is not None:
                out[:, fact] = delta.to(hidden.dtype)
            return out

        with torch.no_grad(), Trace(lm.model, lm.arch.layer(layer), edit_output=add_to_output(added)):
            log_probs = torch.log_softmax(lm.model(torch.tensor([full[:-1]])).logits[0].double(), -1)
        nll = -torch.stack([log_probs[j - 1, full[j]] for j in range(start, len(full))]).mean()
        probs.append(torch.exp(-nll).item())
    return sum(probs) / len(probs)


def test_a_target_true_penalty_is_one_more_kind_of_read(tiny64, caches):
    """A loss term added in rome/compute_v.py and rome/values/layout.py alone (ValueSettings.true_penalty,
    off by default): the layout builds target_true's rows and reads only when the term is on, the
    replays return them as any other read, and the term is the mean probability of target_true."""
    from rome.values.layout import KINDS, TRUE

    lm = tiny64
    hp = tiny_hparams(v_num_grad_steps=1)
    reqs = [make_request({**r, "target_true": t}) for r, t in zip(REQUESTS, TRUES)]
    templates = EditContext(caches).templates(lm, hp)
    assert not (batch_layout.build_batch(lm, reqs, templates, hp).reads.kind == KINDS.index(TRUE)).any()  # off: nothing built
    on = ValueSettings(true_penalty=2.0)
    batch = batch_layout.build_batch(lm, reqs, templates, hp, on.kinds)
    true_reads = batch.reads.select(batch.reads.kind == KINDS.index(TRUE))
    for i, (r, t) in enumerate(zip(reqs, TRUES)):  # a read per target_true token after every templated prompt
        tokens = len(lm.tok(" " + t, add_special_tokens=False)["input_ids"])
        assert int((true_reads.owner == i).sum()) == len(templates) * tokens
    # at delta = 0 (one step records the loss before any update) the term adds 2 x mean P(target_true)
    off_loss = compute_values(lm, reqs, 1, templates, hp).final_loss
    for fast in (True, False):
        on_loss = compute_values(lm, reqs, 1, templates, hp, settings=ValueSettings(fast=fast, true_penalty=2.0)).final_loss
        for request, with_term, without in zip(reqs, on_loss, off_loss):
            expected = 2.0 * true_probability(lm, request, templates, 1)
            assert abs((with_term - without) - expected) <= 1e-9 * expected, (with_term - without, expected)
    # on, it pushes target_true down further than the papers' loss alone does
    hp = tiny_hparams(v_num_grad_steps=12, v_loss_threshold=0.0, v_lr=0.1, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0)
    plain = compute_values(lm, reqs, 1, templates, hp)
    penalised = compute_values(lm, reqs, 1, templates, hp, settings=ValueSettings(true_penalty=1e4))
    for k, request in enumerate(reqs):
        assert true_probability(lm, request, templates, 1, penalised.delta[k]) < true_probability(lm, request, templates, 1, plain.delta[k])
