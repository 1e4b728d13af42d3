"""Editing a model placed with an accelerate device map (as --device auto does on GPU boxes).

Without GPUs the map puts every block on the CPU, but accelerate still wraps each block with its
device-alignment hooks, which our tracing, prefix-cache replay and weight updates must survive
(and give the same update as the plain model)."""
import torch
from accelerate import dispatch_model

from rome.rome_main import apply_rome
from tests.helpers import REQUESTS, context, tiny_hparams
from util.deltas import restore
from util.requests import make_request


def test_edit_under_a_device_map_equals_plain_model(tiny_llama, tmp_path):
    lm, hp = tiny_llama, tiny_hparams(v_num_grad_steps=4)
    request = make_request(REQUESTS[0])
    plain = apply_rome(lm, [request], hp, context(tmp_path))
    restore(lm.model, plain.originals)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(lm.model.config.num_hidden_layers)}}
    dispatch_model(lm.model, device_map=device_map, force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in lm.model.modules())
    mapped = apply_rome(lm, [request], hp, context(tmp_path))
    name = lm.arch.weight_name(1)
    torch.testing.assert_close(mapped.deltas[name], plain.deltas[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lm.model.get_parameter(name), mapped.originals[name] + mapped.deltas[name])
