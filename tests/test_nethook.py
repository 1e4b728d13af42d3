import pytest
import torch

from util.nethook import StopForward, Trace, TraceDict, add_to_output, hidden_of


def ids_for(lm, text="The capital of France is Paris"):
    return lm.tok(text, return_tensors="pt").input_ids


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_input_and_output_match_manual_hooks(tiny):
    model, arch = tiny.model, tiny.arch
    name = arch.down_proj(1)
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(i=a[0].clone(), o=o.clone()))
    ids = ids_for(tiny)
    model(ids)
    handle.remove()
    with Trace(model, name, retain_input=True) as trace:
        model(ids)
    torch.testing.assert_close(trace.input, seen["i"], rtol=0, atol=0)
    torch.testing.assert_close(trace.output, seen["o"], rtol=0, atol=0)
    # The captured output is W k (+ bias) of the captured input, in the arch table's orientation.
    from util.arch import edited_weight

    weight = edited_weight(model, arch, 1)
    bias = getattr(model.get_submodule(name), "bias", None)
    expected = trace.input @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(trace.output, expected, rtol=1e-5, atol=1e-6)
    assert hook_count(model) == 0


def test_add_to_layer_output_changes_logits_exactly_like_adding_to_mlp_output(tiny):
    model, arch = tiny.model, tiny.arch
    ids = ids_for(tiny)
    delta = torch.randn(model.config.hidden_size)

    def at_position(hidden, pos=2):
        d = torch.zeros_like(hidden)
        d[:, pos] = delta
        return d

    with Trace(model, arch.layer(1), edit_output=add_to_output(at_position)):
        via_layer = model(ids).logits
    with Trace(model, arch.down_proj(1), edit_output=add_to_output(at_position)):
        via_mlp = model(ids).logits
    plain = model(ids).logits
    torch.testing.assert_close(via_layer, via_mlp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(via_layer, plain)
    # Positions before the edited one cannot see it (causal attention).
    torch.testing.assert_close(via_layer[:, :2], plain[:, :2], rtol=1e-6, atol=1e-6)


def test_stop_ends_forward_after_module(tiny):
    model, arch = tiny.model, tiny.arch
    later_calls = []
    handle = model.get_submodule(arch.layer(3)).register_forward_hook(lambda *a: later_calls.append(1))
    try:
        with Trace(model, arch.layer(1), stop=True) as trace:
            model(ids_for(tiny))
            pytest.fail("forward pass was not stopped")
    finally:
        handle.remove()
    assert later_calls == []
    assert trace.output.shape[-1] == model.config.hidden_size
    assert hook_count(model) == 0


def test_tracedict_stops_after_last_of_several_modules(tiny):
    model, arch = tiny.model, tiny.arch
    names = [arch.down_proj(2), arch.down_proj(0)]
    with TraceDict(model, names, retain_input=True, stop=True) as traces:
        model(ids_for(tiny))
    assert all(traces[n].input is not None for n in names)
    assert hook_count(model) == 0


def test_hooks_removed_when_forward_raises(tiny):
    model = tiny.model

    def boom(output, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(model, [tiny.arch.layer(0), tiny.arch.layer(1)], edit_output=boom):
            model(ids_for(tiny))
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError):
        with Trace(model, tiny.arch.layer(0), edit_output=boom):
            model(ids_for(tiny))
    assert hook_count(model) == 0


def test_stop_forward_outside_tracer_propagates():
    with pytest.raises(StopForward):
        raise StopForward("x")


def test_hidden_of_handles_tuple_and_tensor():
    t = torch.ones(2)
    assert hidden_of(t) is t
    assert hidden_of((t, None)) is t
