"""Every architecture family the table lists, on a tiny random model built from its own config class
(experiments/tiny_model.py, no download): the table's entries against the model's own forward,
each editor's defining property, and the fast value replay against the straightforward path.
`pytest -k arch` selects these (and the CUDA ones in tests/test_gpu.py, skipped without CUDA).

The families are listed here, not read from the table: a family whose entry is removed fails
(util.arch.arch_for refuses it), and one whose final norm, unembedding, soft-cap, post-norm or
down projection is wrong fails the entry checks below (test_arch_checks_fail_on_a_wrong_entry
shows that they do).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import rome.values.llama_layer as llama_layer
import rome.values.replay as replay
from alphaedit.alphaedit_main import AlphaEditHyperParams
from editors import ALGORITHMS
from emmet.emmet_main import EMMETHyperParams
from encore.encore_main import ENCOREHyperParams
from experiments.benchmark import replay_path
from experiments.metrics.perplexity import nll_of_ids
from experiments.metrics.scoring import score_continuations
from experiments.tiny_model import TINY, tiny_model
from memit.memit_main import MEMITHyperParams
from rome.compute_u import compute_keys
from rome.compute_v import ValueSettings, compute_values
from rome.editor import EditContext, edit_keys
from rome.values.layout import View, build_batch
from tests.helpers import REQUESTS, float64_context, rel, tiny_hparams
from tests.test_eval_perplexity import direct_nll
from tests.test_scoring import reference
from util.arch import ARCHITECTURES, arch_for, edited_weight
from util.errors import ModelLoadError
from util.models import LoadedModel
from util.nethook import Trace
from util.requests import make_request

LISTED = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"]
LLAMA_LAYERS = ["llama", "mistral", "qwen2"]  # the families whose layers compute LlamaDecoderLayer
PROMPT = "The Eiffel Tower is located in the city of"


def tiny_lm(model_type: str, tok, dtype=torch.float32) -> LoadedModel:
    model = tiny_model(model_type, tok).to(dtype)
    return LoadedModel(model, tok, arch_for(model), f"tiny-{model_type}")


@pytest.fixture(params=LISTED)
def arch_lm(request, tokenizer) -> LoadedModel:
    return tiny_lm(request.param, tokenizer)


@pytest.fixture(params=LISTED)
def arch_lm64(request, tokenizer) -> LoadedModel:
    return tiny_lm(request.param, tokenizer, torch.float64)


def requests():
    return [make_request(r) for r in REQUESTS]


def test_arch_table_covers_the_listed_families_and_refuses_others(tokenizer):
    assert set(LISTED) <= set(ARCHITECTURES) and set(LISTED) <= set(TINY)
    lm = tiny_lm("llama", tokenizer)
    lm.model.config.model_type = "mamba"
    with pytest.raises(ModelLoadError) as err:
        arch_for(lm.model)
    assert "model_type 'mamba' is not in the architecture table (util/arch.py)" in str(err.value) and "\n" not in str(err.value)


def final_state_and_logits(lm: LoadedModel):
    """The last layer's output and the model's own logits on PROMPT."""
    ids = lm.tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, lm.arch.layer(lm.model.config.num_hidden_layers - 1)) as last:
        logits = lm.model(input_ids=ids).logits
    return last.output, logits


def entry_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """What the table says follows the last layer: final norm, unembedding, the model's last step."""
    with torch.no_grad():
        head = lm.model.get_submodule(lm.arch.unembed)(lm.model.get_submodule(lm.arch.final_norm)(hidden))
        return lm.arch.final_logits(lm.model.config, head)


def test_arch_final_norm_unembedding_and_softcap_give_the_models_logits(arch_lm64):
    lm = arch_lm64
    hidden, logits = final_state_and_logits(lm)
    torch.testing.assert_close(entry_logits(lm, hidden), logits, rtol=1e-10, atol=1e-10)
    if lm.arch.logit_softcap:  # the tiny configs set a cap that matters: without it the logits differ
        raw = lm.model.get_submodule(lm.arch.unembed)(lm.model.get_submodule(lm.arch.final_norm)(hidden))
        assert rel(raw, logits) > 1e-2


def mlp_output_change(lm: LoadedModel, layer: int, delta: torch.Tensor):
    """(down projection's input and output, the layer's output change) when `delta` is added to the
    down projection's output at every position of PROMPT."""
    ids = lm.tok(PROMPT, return_tensors="pt").input_ids
    outputs = []
    for added in (torch.zeros_like(delta), delta):
        with torch.no_grad(), Trace(lm.model, lm.arch.down_proj(layer), retain_input=True,
                                    edit_output=lambda out, _: out + added) as down, Trace(lm.model, lm.arch.layer(layer)) as block:
            lm.model(input_ids=ids)
        outputs.append((down.input, down.output - added, block.output))
    (key, mlp, before), (_, _, after) = outputs
    return key, mlp, after - before


def test_arch_down_projection_and_its_way_into_the_residual_stream(arch_lm64):
    # v = W k with W oriented as the table says, and the down projection's output joins the residual
    # stream unchanged, or (mlp_post_norm) through the named norm: where a value's delta goes (ArchSpec.site).
    lm, layer = arch_lm64, 1
    delta = 0.3 * torch.randn(lm.model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key, mlp, change = mlp_output_change(lm, layer, delta)
    bias = getattr(lm.model.get_submodule(lm.arch.down_proj(layer)), "bias", None)
    torch.testing.assert_close(key @ edited_weight(lm.model, lm.arch, layer).T + (0 if bias is None else bias), mlp, rtol=1e-10, atol=1e-12)
    if lm.arch.mlp_post_norm is None:
        torch.testing.assert_close(change, delta.expand_as(change), rtol=1e-10, atol=1e-12)
        assert lm.arch.site(layer, "layer") == lm.arch.layer(layer)
    else:
        norm = lm.model.get_submodule(lm.arch.mlp_post_norm.format(layer))
        with torch.no_grad():
            torch.testing.assert_close(change, norm(mlp + delta) - norm(mlp), rtol=1e-10, atol=1e-12)
        assert rel(change, delta.expand_as(change)) > 1e-2
        assert lm.arch.site(layer, "layer") == lm.arch.site(layer, "mlp") == lm.arch.down_proj(layer)


def entry_gives_logits(lm: LoadedModel, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    try:
        ours = entry_logits(lm, hidden)
    except (AttributeError, RuntimeError, TypeError):  # a module that is not there, or not a norm / an unembedding
        return False
    return ours.shape == logits.shape and torch.allclose(ours, logits, rtol=1e-10, atol=1e-10)


def test_arch_checks_fail_on_a_wrong_entry(tokenizer):
    """The entry checks above are not vacuous: a wrong final norm, unembedding, missing soft-cap or
    missing post-norm each break them."""
    gemma = tiny_lm("gemma2", tokenizer, torch.float64)
    hidden, logits = final_state_and_logits(gemma)
    assert entry_gives_logits(gemma, hidden, logits)
    for wrong in (dict(final_norm="model.layers.3.post_feedforward_layernorm"), dict(final_norm="model.layers.3"),
                  dict(logit_softcap=None), dict(unembed="model.embed_tokens"), dict(unembed="lm_head.weight")):
        gemma.arch = dataclasses.replace(ARCHITECTURES["gemma2"], **wrong)
        assert not entry_gives_logits(gemma, hidden, logits), wrong
    delta = torch.full((gemma.model.config.hidden_size,), 0.3, dtype=torch.float64)
    _, _, change = mlp_output_change(gemma, 1, delta)
    assert rel(change, delta.expand_as(change)) > 1e-2  # what an entry without mlp_post_norm would assume is false


def test_arch_fast_values_equal_the_straightforward_values(arch_lm, caches):
    lm = arch_lm
    hp = tiny_hparams(v_num_grad_steps=3)
    templates = EditContext(caches).templates(lm, hp)
    fast = compute_values(lm, requests()[:2], 1, templates, hp, settings=ValueSettings(fast=True))
    slow = compute_values(lm, requests()[:2], 1, templates, hp, settings=ValueSettings(fast=False))
    err = (fast.target - slow.target).norm(dim=-1) / slow.target.norm(dim=-1)
    assert err.max().item() < 1e-4, err
    assert fast.steps == slow.steps
    torch.testing.assert_close(torch.tensor(fast.final_loss), torch.tensor(slow.final_loss), rtol=1e-4, atol=1e-5)


def test_arch_replay_is_chosen_from_the_table(arch_lm, caches):
    # Under mixed precision the functional Llama layer serves the families the table says compute
    # Llama's layer, transformers' modules the others; either gives the full model's log-probs to
    # bfloat16's precision.
    lm = arch_lm
    hp = tiny_hparams()
    batch = build_batch(lm, requests(), EditContext(caches).templates(lm, hp), hp)
    view = View(batch, [0, 1, 2])
    deltas = 0.1 * torch.randn(3, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    runtime = replay.ReplayRuntime()
    try:
        chosen = replay.make_replay(lm, batch, 1, hp.v_loss_layer, runtime=runtime, autocast=torch.bfloat16)
        assert lm.arch.llama_layers == (lm.model.config.model_type in LLAMA_LAYERS)
        assert isinstance(chosen, replay.LlamaReplay if lm.arch.llama_layers else replay.ModuleReplay)
        mixed = chosen(deltas, view)
    finally:
        runtime.close()
    torch.testing.assert_close(mixed, replay.FullModel(lm, batch, 1)(deltas, view), rtol=0, atol=0.1)
    # experiments/benchmark.py reports the same choice
    said = replay_path(lm, requests()[0], hp, "bfloat16")
    assert said.startswith(f"value replay of {lm.name} ({lm.model.config.model_type}, values in bfloat16): {type(chosen).__name__}")


@pytest.mark.parametrize("model_type", LLAMA_LAYERS)
def test_arch_llama_function_replays_the_families_layers_exactly(model_type, tokenizer, monkeypatch, caches):
    lm = tiny_lm(model_type, tokenizer)
    hp = tiny_hparams(v_num_grad_steps=3)
    templates = EditContext(caches).templates(lm, hp)
    calls, layer_function = [], llama_layer.llama_layer
    monkeypatch.setattr(llama_layer, "llama_layer", lambda *args: calls.append(1) or layer_function(*args))
    ours = compute_values(lm, requests(), 1, templates, hp, settings=ValueSettings(autocast=torch.bfloat16))
    assert calls, "the functional replay did not run"
    monkeypatch.setattr(llama_layer, "is_plain_llama", lambda layer: False)
    theirs = compute_values(lm, requests(), 1, templates, hp, settings=ValueSettings(autocast=torch.bfloat16))
    assert torch.equal(ours.delta, theirs.delta) and ours.final_loss == theirs.final_loss and ours.steps == theirs.steps


def test_arch_scoring_and_perplexity_read_the_models_own_log_probs(arch_lm, tmp_path):
    # Evaluation unembeds only the states it reads (experiments/metrics): as the model would, soft-cap included.
    lm = arch_lm
    prompts, targets = ["The capital of France is", "Porsche 911, created by"], ["Paris", "Honda motors"]
    for prompt, target, score in zip(prompts, targets, score_continuations(lm, prompts, targets, batch_size=2)):
        values, argmax = reference(lm, prompt, target)
        torch.testing.assert_close(torch.tensor(score.token_logprobs, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert score.argmax == argmax
    ids = lm.tok(" ".join([PROMPT] * 6), add_special_tokens=False)["input_ids"]
    total, count = direct_nll(lm, ids, 24)
    assert nll_of_ids(lm, ids, 24, 2) == (pytest.approx(total, rel=1e-5), count)


# The editors' defining properties, on each family (float64). Few value steps: the solves are checked.
STEPS = dict(v_num_grad_steps=3)


def edit_once(lm, alg, hp, ctx):
    """(K at layer 1 before the edit, Delta, R) of one edit of two requests; one layer: the residual
    R is the optimised value delta."""
    batch = requests()[:2]
    K = edit_keys(lm, batch, [1], hp, ctx).k_star[1].T  # m x n
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = ALGORITHMS[alg].apply(lm, batch, hp, ctx)
    return K, edited_weight(lm.model, lm.arch, 1) - W, result.value_deltas.double().T


def test_arch_r_rome_maps_k_star_to_v_star(arch_lm64, tmp_path):
    lm = arch_lm64
    ctx = float64_context(lm, tmp_path)
    hp = tiny_hparams(**STEPS)
    request = requests()[0]
    keys = compute_keys(lm, [request], [1], ctx.templates(lm, hp), hp.fact_token)
    W = edited_weight(lm.model, lm.arch, 1).clone()
    result = ALGORITHMS["R-ROME"].apply(lm, [request], hp, ctx)
    W_new = edited_weight(lm.model, lm.arch, 1)
    v_star = W @ keys.k_bare[1][0] + result.value_deltas[0].double()  # the output at the bare prompt + the optimised delta
    assert rel(W_new @ keys.k_star[1][0], v_star) < 1e-8
    assert torch.linalg.matrix_rank(W_new - W).item() == 1


def test_arch_memit_solves_its_normal_equations(arch_lm64, tmp_path):
    lm = arch_lm64
    ctx = float64_context(lm, tmp_path)
    hp = tiny_hparams(MEMITHyperParams, mom2_update_weight=50.0, **STEPS)
    K, delta, R = edit_once(lm, "MEMIT", hp, ctx)
    C0 = ctx.second_moments(lm, hp)[1]
    assert rel(delta @ (hp.mom2_update_weight * C0 + K @ K.T), R @ K.T) < 1e-8


def test_arch_emmet_meets_its_constraint_at_least_cost(arch_lm64, tmp_path):
    lm = arch_lm64
    ctx = float64_context(lm, tmp_path)
    hp = tiny_hparams(EMMETHyperParams, mom2_update_weight=10.0, emmet_lambda=0.0, **STEPS)
    K, delta, R = edit_once(lm, "EMMET", hp, ctx)
    assert rel(delta @ K, R) < 1e-8
    C = (hp.mom2_update_weight * ctx.second_moments(lm, hp)[1]).numpy()
    m, n = K.shape  # KKT of min tr(D C D^T) s.t. D K = R
    kkt = np.block([[2 * C, K.numpy()], [K.numpy().T, np.zeros((n, n))]])
    expected = np.linalg.solve(kkt, np.concatenate([np.zeros((m, R.shape[0])), R.numpy().T]))[:m].T
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_arch_alphaedit_solves_in_the_null_space(arch_lm64, tmp_path):
    lm = arch_lm64
    ctx = float64_context(lm, tmp_path)
    C0 = ctx.second_moments(lm, tiny_hparams(AlphaEditHyperParams))[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(C0)
    threshold = eigenvalues.median().item()
    hp = tiny_hparams(AlphaEditHyperParams, nullspace_threshold=threshold, L2=1e-4, **STEPS)
    K, delta, R = edit_once(lm, "AlphaEdit", hp, ctx)
    U = eigenvectors[:, eigenvalues < threshold]
    P = U @ U.T  # Delta (K K^T P + alpha I) = R K^T P, and Delta = Delta P
    assert rel(delta @ (K @ K.T @ P + hp.L2 * torch.eye(len(P), dtype=torch.float64)), R @ K.T @ P) < 1e-8
    assert (delta - delta @ P).norm() < 1e-9 * delta.norm()


def test_arch_encore_solves_its_normal_equations(arch_lm64, tmp_path):
    lm = arch_lm64
    ctx = float64_context(lm, tmp_path)
    hp = tiny_hparams(ENCOREHyperParams, mom2_update_weight=50.0, update_norm_lambda=0.01, **STEPS)
    K, delta, R = edit_once(lm, "ENCORE", hp, ctx)
    C0 = ctx.second_moments(lm, hp)[1]
    system = hp.mom2_update_weight * C0 + hp.update_norm_lambda * torch.eye(len(C0), dtype=torch.float64) + K @ K.T
    assert rel(delta @ system, R @ K.T) < 1e-8
