"""UltraEdit against an independent computation of its release (XiaojieGu/UltraEdit: data/base.py's
collate_fn, editor/ultraedit.py's cache and predict_param_shifts, nets.py's RunningMeanStd) in
float64 on tiny GPT-2 and Llama models, over two sequential edits so that the running
normalisation carries over (through its checkpointed form, as a continued run has it). The
reference hooks the modules as the release does (a forward hook for the keys, a full backward hook
for the gradients of the outputs), runs each prompt alone and solves with torch.linalg.solve.
Tokenisation is shared with the editor (docs/fidelity.md)."""
from __future__ import annotations

import pytest
import torch

from editors import ALGORITHMS, load_algorithm_hparams
from tests.helpers import MULTI_TOKEN, context
from ultraedit.ultraedit_main import STATE, UltraEditHyperParams, apply_ultraedit, edited_weights
from util.deltas import restore, snapshot
from util.errors import HparamsError, ModelLoadError
from util.hparams import build_hparams
from util.requests import make_request
from util.state import state_from_tensors, state_to_tensors
from util.tokens import encode_with_target

TOLERANCE = 1e-6
# The edited modules as the release's config names them, per architecture; gate and up
# projections share a shape (one normaliser), the down projection has its own.
MODULES = {
    "llama": ({"mlp_gate": [1], "mlp_up": [1, 2], "mlp_down": [2]},
              ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]),
    "gpt2": ({"mlp_up": [1, 2], "mlp_down": [2]},
             ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"]),
}


class ReleaseRunningMeanStd:
    """nets.RunningMeanStd, in float64."""

    def __init__(self, size: int):
        self.n, self.mean, self.var = torch.zeros(1, dtype=torch.float64), torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x):
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def __call__(self, x):
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


def shape_of(module) -> tuple[int, int]:
    """util.get_shape: (in, out) for nn.Linear (stored out x in) and Conv1D (stored in x out)."""
    shape = tuple(module.weight.shape)
    return shape[::-1] if isinstance(module, torch.nn.Linear) else shape


def reference_step(lm, requests, names: list[str], hp, normalisers: dict) -> dict[str, torch.Tensor]:
    """One sequential_valid step: cache every tuple, then predict and apply every module's shift."""
    encoded = []
    for r in requests:  # data/zsre.py's tok_tuples: prompt + answer[:-1], labels on the answer tokens
        ids, start = encode_with_target(lm.tok, r.text, r.target_new)
        encoded.append((ids[:-1], list(range(start - 1, len(ids) - 1)), ids[start:]))
    ordered = sorted(encoded, key=lambda e: len(e[0]), reverse=True)  # collate_fn's sort
    tuples = [ordered[i:i + hp.batch_size] for i in range(0, len(ordered), hp.batch_size)]
    modules = {name: lm.model.get_submodule(name) for name in names}
    cached = {name: [] for name in names}
    for module in modules.values():
        module.weight.requires_grad_(True)  # model.py's make_model
    try:
        for t in tuples:
            n_tokens = sum(len(labels) for _, _, labels in t)
            per_module = {name: ([], []) for name in names}
            for ids, positions, labels in t:  # each prompt alone; its share of the tuple's mean loss
                handles = []
                for name, module in modules.items():
                    keys, grads = per_module[name]
                    handles.append(module.register_forward_hook(lambda m, i, o, keys=keys: keys.append(i[0][0, positions].detach())))
                    handles.append(module.register_full_backward_hook(lambda m, gi, go, grads=grads: grads.append(go[0][0, positions].detach())))
                try:
                    with torch.enable_grad():
                        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, positions]
                        (torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="sum") / n_tokens).backward()
                finally:
                    for handle in handles:
                        handle.remove()
            for name, module in modules.items():  # cache(): every module, in config order
                keys, grads = torch.cat(per_module[name][0]), torch.cat(per_module[name][1])
                normalisers.setdefault(shape_of(module), ReleaseRunningMeanStd(sum(shape_of(module)))).update(torch.cat((keys, grads), -1))
                cached[name].append((keys, grads))
    finally:
        for module in modules.values():
            module.weight.requires_grad_(False)
            module.weight.grad = None
    shifts = {}
    for name, module in modules.items():  # predict_param_shifts
        shape = shape_of(module)
        hidden_states = torch.cat([k for k, _ in cached[name]])
        values_grad = torch.cat([g for _, g in cached[name]])
        z = normalisers[shape](torch.cat((hidden_states, values_grad), -1))
        hidden_states_hat, pseudo_values_hat = z.split([shape[0], shape[1]], -1)
        coeffs = -hp.lr * (hidden_states_hat * hidden_states_hat).sum(-1).unsqueeze(-1)
        mat = hidden_states.T @ hidden_states + torch.eye(shape[0], dtype=torch.float64)
        shifts[name] = torch.linalg.solve(mat, hidden_states.T @ (coeffs * pseudo_values_hat))
    with torch.no_grad():  # edit_model
        for name, module in modules.items():
            module.weight += shifts[name].T if isinstance(module, torch.nn.Linear) else shifts[name]
    return {name + ".weight": (shifts[name].T if isinstance(module, torch.nn.Linear) else shifts[name]) for name, module in modules.items()}


STEPS = [MULTI_TOKEN, [{**r, "target_new": t} for r, t in zip(MULTI_TOKEN, ["chess", "Finnish", "Tokyo", "the ancient city of Ur"])]]


# The release's hooks on modules whose inputs need no gradient (only their weights do): torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_ultraedit_conforms_to_its_release_over_two_edits(tiny64, tmp_path):
    lm = tiny64
    model_type = "gpt2" if lm.arch.transposed else "llama"
    sites, names = MODULES[model_type]
    hp = build_hparams(UltraEditHyperParams, {"modules": sites, "lr": 1e-3, "batch_size": 2}, "tiny UltraEdit hparams")
    assert edited_weights(lm, hp) == [name + ".weight" for name in names]
    ctx = context(tmp_path)
    start = snapshot(lm.model, edited_weights(lm, hp))
    ours = []
    for step in STEPS:
        ours.append(apply_ultraedit(lm, [make_request(r) for r in step], hp, ctx).deltas)
        ctx.state = state_from_tensors(*state_to_tensors(ctx.state))  # as a continued run has it
    assert len(ctx.state[STATE]) == (2 if len(set(sites)) > 1 else 1)
    restore(lm.model, start)
    normalisers = {}
    for step, deltas in zip(STEPS, ours):
        reference = reference_step(lm, [make_request(r) for r in step], names, hp, normalisers)
        assert sorted(deltas) == sorted(reference)
        for name in reference:
            assert ((deltas[name] - reference[name]).norm() / reference[name].norm()).item() < TOLERANCE, name
    for shape, normaliser in normalisers.items():  # the running statistics, too
        state = ctx.state[STATE][f"{shape[0]}x{shape[1]}"]
        torch.testing.assert_close(state["mean"], normaliser.mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(state["var"], normaliser.var, rtol=1e-9, atol=1e-12)


def test_a_first_edit_of_one_token_is_finite(tiny_llama, tmp_path):
    """One key row: the release's unbiased variance of one row is NaN (every later update too); here
    its spread is 0, so the first edit normalises to 0 and changes nothing, and the next one edits."""
    hp = build_hparams(UltraEditHyperParams, {"modules": {"mlp_down": [1]}, "lr": 1e-3}, "tiny")
    ctx = context(tmp_path)
    one = [make_request({**MULTI_TOKEN[2], "target_new": "Rome"})]  # a one-token target
    first = apply_ultraedit(tiny_llama, one, hp, ctx).deltas
    other = [make_request({**MULTI_TOKEN[3], "target_new": "Paris"})]  # another key (a repeated prompt has a zero spread)
    second = apply_ultraedit(tiny_llama, other, hp, ctx).deltas
    (name,) = first
    assert torch.count_nonzero(first[name]) == 0
    assert torch.isfinite(second[name]).all() and second[name].norm() > 0


def test_hparams_and_sites():
    hp = load_algorithm_hparams("UltraEdit", "Meta-Llama-3-8B-Instruct")
    assert hp == load_algorithm_hparams("UltraEdit", "Llama-3-8B") and type(hp) is ALGORITHMS["UltraEdit"].hparams_class
    assert hp.modules == {"mlp_gate": [11, 12, 13, 14, 15], "mlp_up": [18, 19, 20, 21, 22, 23, 24]} and hp.lr == 1e-6
    hp.check_model(32)
    with pytest.raises(HparamsError, match="modules.mlp_up': layer 24 does not exist"):
        hp.check_model(24)
    load_algorithm_hparams("UltraEdit", "smollm2-135m").check_model(30)
    load_algorithm_hparams("UltraEdit", "EleutherAI_gpt-j-6B").check_model(28)
    with pytest.raises(HparamsError, match="site 'mlp' is not one of"):
        build_hparams(UltraEditHyperParams, {"modules": {"mlp": [1]}}, "x")


def test_a_site_the_architecture_lacks_fails_in_one_line(tiny_gpt2):
    hp = build_hparams(UltraEditHyperParams, {"modules": {"mlp_gate": [1]}}, "x")
    with pytest.raises(ModelLoadError, match="site 'mlp_gate' is not in the architecture table"):
        ALGORITHMS["UltraEdit"].edited_params(tiny_gpt2, hp)
