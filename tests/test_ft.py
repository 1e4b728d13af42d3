"""FT-L and FT-M against an independent computation of the reference loops (kmeng01/rome
baselines/ft/ft_main.py's execute_ft; EasyEdit's ft_main.py with objective_optimization
target_new), in float64 on tiny GPT-2 and Llama models: each prompt through the model alone, the
tuned parameters found by the reference's substring rule on the module template, Adam on them, a
step only while the chunk's loss is >= 1e-2, the L-infinity clamp after every chunk, and the stop
once a pass's size-weighted mean loss is below 1e-2. Tokenisation is shared with the editors (as
in tests/test_conformance.py; audited in docs/fidelity.md)."""
from __future__ import annotations

import pytest
import torch

from editors import ALGORITHMS, load_algorithm_hparams
from ft.ft_main import FTHyperParams, apply_ft, tuned_params
from tests.helpers import MULTI_TOKEN, context
from util.deltas import restore, snapshot
from util.errors import HparamsError
from util.hparams import build_hparams
from util.requests import make_request
from util.tokens import encode_with_target

TOLERANCE = 1e-6
# The reference's rewrite_module_tmp per architecture and site ("mlp": the whole block).
TEMPLATES = {("gpt2", "mlp"): "transformer.h.{}.mlp", ("gpt2", "mlp_down"): "transformer.h.{}.mlp.c_proj",
             ("llama", "mlp"): "model.layers.{}.mlp", ("llama", "mlp_down"): "model.layers.{}.mlp.down_proj"}


def ft_hparams(**values) -> FTHyperParams:
    return build_hparams(FTHyperParams, {"layers": [1], "num_steps": 6, "lr": 2e-3, "norm_constraint": 2e-3, **values}, "tiny FT hparams")


def request_loss(lm, request, objective: str) -> torch.Tensor:
    """The reference's loss of one request, its prompt alone through the model."""
    ids, start = encode_with_target(lm.tok, request.text, request.target_new)
    targets = torch.tensor(ids[start:])
    if objective == "prompt_last":  # every target token scored at the prompt's last position
        log_probs = torch.log_softmax(lm.model(input_ids=torch.tensor([ids[:start]])).logits[0, -1], dim=-1)
        return -log_probs[targets].mean()
    logits = lm.model(input_ids=torch.tensor([ids[:-1]])).logits[0]  # teacher-forced, target tokens only
    return torch.nn.functional.cross_entropy(logits[start - 1:], targets)


def reference_ft(lm, requests, template: str, hp: FTHyperParams) -> tuple[dict[str, torch.Tensor], int]:
    """execute_ft's loop; returns the deltas and the number of passes run. Its threshold, 1e-2 in the
    reference, is hp.loss_threshold (a tiny random model's loss cannot reach 1e-2)."""
    threshold = hp.loss_threshold
    weights = {n: p for n, p in lm.model.named_parameters() for layer in hp.layers if template.format(layer) in n}
    copy = {n: p.detach().clone() for n, p in weights.items()}
    opt = torch.optim.Adam(list(weights.values()), lr=hp.lr, weight_decay=hp.weight_decay)
    for w in weights.values():
        w.requires_grad_(True)
    passes = 0
    try:
        for _ in range(hp.num_steps):
            total, count = 0.0, 0
            for start in range(0, len(requests), hp.batch_size):
                chunk = requests[start:start + hp.batch_size]
                opt.zero_grad()
                with torch.enable_grad():
                    loss = torch.stack([request_loss(lm, r, hp.objective) for r in chunk]).mean()
                total, count = total + loss.item() * len(chunk), count + len(chunk)
                if loss.item() >= threshold:
                    loss.backward()
                    opt.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for k, v in weights.items():
                            v[...] = torch.clamp(v, min=copy[k] - hp.norm_constraint, max=copy[k] + hp.norm_constraint)
            passes += 1
            if total / count < threshold:
                break
        deltas = {k: (weights[k] - copy[k]).detach() for k in weights}
    finally:
        for k, w in weights.items():
            w.requires_grad_(False)
            w.grad = None
        restore(lm.model, copy)
    return deltas, passes


def check_conforms(lm, hp: FTHyperParams, site: str, requests, ctx) -> tuple[dict, object]:
    names = tuned_params(lm, hp)
    before = snapshot(lm.model, names)
    result = apply_ft(lm, requests, hp, ctx)
    after = snapshot(lm.model, names)
    restore(lm.model, before)
    model_type = "gpt2" if lm.arch.transposed else "llama"
    reference, passes = reference_ft(lm, requests, TEMPLATES[(model_type, site)], hp)
    assert sorted(reference) == sorted(names)  # the same parameters, weights and biases
    for name in names:
        ours = after[name] - before[name]
        assert torch.equal(result.deltas[name], ours), name
        assert ((ours - reference[name]).norm() / reference[name].norm()).item() < TOLERANCE, name
    assert result.layers[0]["ft_passes"] == passes
    return reference, result


@pytest.mark.parametrize("site", ["mlp", "mlp_down"])
def test_ft_l_conforms_to_the_rome_baseline(tiny64, tmp_path, site):
    """Two layers, chunks of 3 and 1: the clamp binds (so it is tested), every pass runs."""
    requests = [make_request(r) for r in MULTI_TOKEN]
    hp = ft_hparams(layers=[1, 2], site=site, batch_size=3, weight_decay=0.01)
    reference, result = check_conforms(tiny64, hp, site, requests, context(tmp_path))
    bound = max(d.abs().max().item() for d in reference.values())
    assert bound == pytest.approx(hp.norm_constraint, rel=1e-9)  # some entries sit at the bound
    assert all(record["delta_max"] <= hp.norm_constraint * (1 + 1e-9) for record in result.layers)
    assert result.layers[0]["ft_passes"] == hp.num_steps


def test_ft_m_conforms_to_easyedit_and_stops_below_the_threshold(tiny64, tmp_path):
    """Teacher-forced target loss, unconstrained, chunks of 2 and 1, and a threshold the tiny model's
    loss (~10.8 at the start: its logits are small) falls below after a few passes: chunks then
    stop stepping and the loop ends early, as in the reference."""
    requests = [make_request(r) for r in MULTI_TOKEN[:3]]
    hp = ft_hparams(layers=[1, 2], site="mlp", objective="target_new", norm_constraint=None, lr=0.01, num_steps=20,
                    batch_size=2, loss_threshold=9.95)
    _, result = check_conforms(tiny64, hp, "mlp", requests, context(tmp_path))
    assert 3 < result.layers[0]["ft_passes"] < hp.num_steps
    assert result.layers[0]["ft_updates"] < 2 * result.layers[0]["ft_passes"]  # some chunk skipped its step


def test_the_objectives_differ_on_multi_token_targets(tiny64):
    """prompt_last scores every target token at the prompt's last position; target_new teacher-forces."""
    request = make_request(MULTI_TOKEN[3])  # six target tokens
    last, forced = (request_loss(tiny64, request, objective).item() for objective in ("prompt_last", "target_new"))
    assert abs(last - forced) > 1e-3


def test_registry_hparams_and_fixed_objective():
    assert ALGORITHMS["FT-L"].fixed == {"objective": "prompt_last"} and ALGORITHMS["FT-M"].fixed == {"objective": "target_new"}
    for alg, objective in (("FT-L", "prompt_last"), ("FT-M", "target_new")):
        for model in ("smollm2-135m", "gpt2-xl", "EleutherAI_gpt-j-6B", "Llama-3-8B", "Meta-Llama-3-8B-Instruct"):
            hp = load_algorithm_hparams(alg, model)
            assert type(hp) is FTHyperParams and hp.objective == objective
    assert load_algorithm_hparams("FT-L", "gpt2-xl").norm_constraint == 5e-4  # the ROME paper's constrained FT
    assert load_algorithm_hparams("FT-M", "Llama-3-8B").norm_constraint is None  # EasyEdit's
    with pytest.raises(HparamsError, match="key 'objective' is set by the algorithm"):
        load_algorithm_hparams("FT-L", "smollm2-135m", ["objective=target_new"])
    with pytest.raises(HparamsError, match="norm_constraint"):
        ft_hparams(norm_constraint=0)
    with pytest.raises(HparamsError, match="site"):
        ft_hparams(site="attention")
