"""Conformance with the reference implementations (kmeng01/rome, rebuilding-rome, kmeng01/memit,
the unified EMMET code, AlphaEdit, ENCORE): an independent computation written here from those
codes' conventions must give our k*, v* and Delta to 1e-6 relative, in float64 on tiny models.

The reference side runs every prompt alone (no batching, padding or replay), with plain forward
hooks, Adam on one delta per request, and each editor's closed form written as its code writes it
(explicit inverses where the code uses them). The conventions under test:
  - KL term: next-token distribution of "{} is a" read at the lookup index (the subject's last token);
  - keys: ROME's compute_u averages all templates alike; MEMIT's compute_ks (EMMET, AlphaEdit,
    ENCORE) averages within each template group ([bare], [generated ...]) and then across groups;
  - r-ROME: target = target_init + delta, right vector (target - mean templated output) / (k* . u);
  - original ROME: k and the current output from the bare prompt.
Tokenisation (which token is the fact token, how the target joins the prompt) is shared with the
editors on purpose: it is audited in docs/fidelity.md, not here."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from alphaedit.alphaedit_main import AlphaEditHyperParams, apply_alphaedit
from emmet.emmet_main import EMMETHyperParams, apply_emmet
from encore.encore_main import ENCOREHyperParams, apply_encore
from memit.memit_main import MEMITHyperParams, apply_memit
from rome.editor import edit_keys
from rome.hparams import ROMEHyperParams
from rome.rome_main import apply_rome
from tests.helpers import REQUESTS, context, tiny_hparams
from util.arch import edited_weight
from util.deltas import restore
from util.requests import make_request
from util.tokens import encode_with_target, subject_position


# Two generated groups of unequal size: group-weighted and plain means differ.
CONFORMANCE = dict(context_template_length_params=[[5, 2], [4, 3]], v_num_grad_steps=5, kl_factor=0.5)
TOLERANCE = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, hidden):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _read_at(lm, site: str, ids: list[int], index: int, read) -> tuple[torch.Tensor, ...]:
    """One prompt alone through the model; the tensors read(args, output) at `site`, at position `index`."""
    seen = {}
    handle = lm.model.get_submodule(site).register_forward_hook(
        lambda m, args, out: seen.update(v=tuple(t[0, index].double() for t in read(args, _hidden(out)))))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["v"]


def reference_keys(lm, request, layer: int, templates: list[str], fact_token: str):
    """Per template: the down projection's input and output at the fact token, one prompt at a time."""
    keys, outputs = [], []
    for template in templates:
        ids, index = subject_position(lm.tok, template.format(request.prompt), request.subject, fact_token)
        key, output = _read_at(lm, lm.arch.down_proj(layer), ids, index, lambda args, out: (args[0], out))
        keys.append(key)
        outputs.append(output)
    return torch.stack(keys), torch.stack(outputs)


def group_sizes(hp) -> list[int]:
    """MEMIT's context_type_lens: the bare template, then one group per [length, count]."""
    return [1] + [count for _, count in hp.context_template_length_params]


def memit_key(lm, request, layer: int, hp, templates: list[str]) -> torch.Tensor:
    """compute_ks: the keys' mean within each context-template group, then across groups."""
    per_template, means, start = reference_keys(lm, request, layer, templates, hp.fact_token)[0], [], 0
    for size in group_sizes(hp):
        means.append(per_template[start:start + size].mean(0))
        start += size
    return torch.stack(means).mean(0)


def reference_value(lm, request, site: str, templates: list[str], hp) -> tuple[torch.Tensor, torch.Tensor, int]:
    """compute_v / compute_z as the reference codes write them: (target, target_init, updates)."""
    tok = lm.tok
    rewrites, lookups, targets = [], [], []
    for template in templates:
        prompt = template.format(request.prompt)
        full, start = encode_with_target(tok, prompt.format(request.subject), request.target_new)
        _, index = subject_position(tok, prompt, request.subject, hp.fact_token)
        rewrites.append(full[:-1])
        lookups.append(index)
        targets.append((list(range(start - 1, len(full) - 1)), full[start:]))
    kl_prompts = [subject_position(tok, p, request.subject, hp.fact_token) for p in hp.kl_prompts]
    module = lm.model.get_submodule(site)
    dim = lm.model.config.hidden_size
    delta = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    target_init, kl_init, updates = None, None, 0

    def run(ids, index):
        def add_delta(m, args, out):
            nonlocal target_init
            hidden = _hidden(out)
            if target_init is None:  # the first prompt is the bare one ("{}")
                target_init = hidden[0, index].detach().clone()
            hidden = hidden.clone()
            hidden[0, index] = hidden[0, index] + delta
            return _with_hidden(out, hidden)

        handle = module.register_forward_hook(add_delta)
        try:
            return torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        finally:
            handle.remove()

    for it in range(hp.v_num_grad_steps):
        nll = 0.0
        for ids, index, (positions, tokens) in zip(rewrites, lookups, targets):
            log_probs = run(ids, index)
            nll = nll - log_probs[positions, tokens].sum() / len(tokens)
        nll = nll / len(rewrites)
        kl_log_probs = torch.stack([run(ids, index)[index] for ids, index in kl_prompts])  # at the lookup index
        if kl_init is None:
            kl_init = kl_log_probs.detach().clone()
        kl = (kl_log_probs.exp() * (kl_log_probs - kl_init)).sum(-1).mean()
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / target_init.norm() ** 2
        if loss.item() < hp.v_loss_threshold or it == hp.v_num_grad_steps - 1:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updates += 1
        max_norm = hp.clamp_norm_factor * target_init.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return target_init + delta.detach(), target_init, updates


def _our_weights(lm, layers):
    return {layer: edited_weight(lm.model, lm.arch, layer).clone() for layer in layers}


@pytest.mark.parametrize("original", [False, True], ids=["r-ROME", "ROME"])
def test_rome_and_r_rome_conform(tiny64, tmp_path, original):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(ROMEHyperParams, original_implementation=original, **CONFORMANCE)
    request = make_request(REQUESTS[0])
    templates = ctx.templates(lm, hp)
    before = _our_weights(lm, [1])
    ours_keys = edit_keys(lm, [request], [1], hp, ctx)
    result = apply_rome(lm, [request], hp, ctx)
    ours_delta = edited_weight(lm.model, lm.arch, 1) - before[1]
    restore(lm.model, result.originals)

    keys, outputs = reference_keys(lm, request, 1, templates, hp.fact_token)
    k_star = keys.mean(0)  # compute_u: every template alike
    assert rel(ours_keys.k_star[1][0], k_star) < TOLERANCE
    target, target_init, updates = reference_value(lm, request, lm.arch.down_proj(1), templates, hp)
    assert rel(target_init + result.value_deltas[0].double(), target) < TOLERANCE
    assert result.requests[0]["v_steps"] == updates
    u = torch.linalg.solve(ctx.second_moments(lm, hp)[1], k_star)
    u = u / u.norm()
    if original:  # compute_v: the bare prompt's input and output
        cur_input, cur_output = keys[0], outputs[0]
    else:  # rebuilding-rome, enable_random_prefix_keys: averaged over the templates
        cur_input, cur_output = keys.mean(0), outputs.mean(0)
    right = (target - cur_output) / torch.dot(cur_input, u)
    assert rel(ours_delta, torch.outer(right, u)) < TOLERANCE


def reference_batch_update(lm, requests, hp, ctx, solve, prior=None):
    """memit_main's layer loop: keys from the current model, residual against the bare prompt's
    output at the last edited layer, spread over the layers left. `solve(K, R, layer, prior)` is
    the editor's closed form (Delta, d x m). Returns the deltas, the targets and target_inits
    (n x d) and the updates per request."""
    templates = ctx.templates(lm, hp)
    site = lm.arch.layer(hp.layers[-1])
    values = [reference_value(lm, r, site, templates, hp) for r in requests]
    targets = torch.stack([target for target, _, _ in values]).T  # d x n
    deltas = {}
    for i, layer in enumerate(hp.layers):
        K = torch.stack([memit_key(lm, r, layer, hp, templates) for r in requests]).T
        current = torch.stack([_bare_output(lm, r, site, hp.fact_token) for r in requests]).T
        R = (targets - current) / (len(hp.layers) - i)
        deltas[layer] = solve(K, R, layer, None if prior is None else prior.get(layer))
        with torch.no_grad():
            weight = edited_weight(lm.model, lm.arch, layer)
            weight += deltas[layer]  # a view in the stored orientation: edits the parameter
    return deltas, targets.T, torch.stack([init for _, init, _ in values]), [updates for _, _, updates in values]


def _bare_output(lm, request, site: str, fact_token: str) -> torch.Tensor:
    ids, index = subject_position(lm.tok, request.prompt, request.subject, fact_token)
    return _read_at(lm, site, ids, index, lambda args, out: (out,))[0]


def _check_batch(lm, ctx, hp, apply, solve, n_batches: int = 1, cache_keys: bool = False):
    """Ours vs the reference over `n_batches` sequential batches of the three requests (the second
    batch edits the edited model; `cache_keys`: K_p K_p^T accumulates the keys written, recomputed
    on the edited model as AlphaEdit's cache_c)."""
    batches = [[make_request({**r, "case_id": r["case_id"] + 10 * b, "target_new": t})
                for r, t in zip(REQUESTS, targets)] for b, targets in enumerate([["football", "English", "Rome"],
                                                                                  ["chess", "French", "Tokyo"]][:n_batches])]
    start = _our_weights(lm, hp.layers)
    ours = []
    for batch in batches:
        keys = edit_keys(lm, batch, hp.layers[:1], hp, ctx).k_star[hp.layers[0]]  # before this batch's edit
        before = _our_weights(lm, hp.layers)
        result = apply(lm, batch, hp, ctx)
        ours.append((keys, result, {layer: edited_weight(lm.model, lm.arch, layer) - before[layer] for layer in hp.layers}))
    with torch.no_grad():
        for layer in hp.layers:
            edited_weight(lm.model, lm.arch, layer).copy_(start[layer])

    prior = {}
    for batch, (our_keys, result, our_deltas) in zip(batches, ours):
        ref_K = torch.stack([memit_key(lm, r, hp.layers[0], hp, ctx.templates(lm, hp)) for r in batch])
        assert rel(our_keys, ref_K) < TOLERANCE
        deltas, targets, inits, updates = reference_batch_update(lm, batch, hp, ctx, solve, prior if cache_keys else None)
        assert rel(inits + result.value_deltas.double(), targets) < TOLERANCE  # v*
        assert [r["v_steps"] for r in result.requests] == updates
        for layer in hp.layers:
            assert rel(our_deltas[layer], deltas[layer]) < TOLERANCE, layer
        if cache_keys:
            for layer in hp.layers:
                K = torch.stack([memit_key(lm, r, layer, hp, ctx.templates(lm, hp)) for r in batch]).T
                prior[layer] = prior.get(layer, 0) + K @ K.T


def test_memit_conforms(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(MEMITHyperParams, layers=[1, 2], mom2_update_weight=50.0, **CONFORMANCE)
    C0 = {layer: ctx.second_moments(lm, hp)[layer] for layer in hp.layers}

    def solve(K, R, layer, prior):  # memit_main: adj_k = solve(lambda C + K K^T, K); upd = resid adj_k^T
        adj_k = torch.linalg.solve(hp.mom2_update_weight * C0[layer] + K @ K.T, K)
        return R @ adj_k.T

    _check_batch(lm, ctx, hp, apply_memit, solve)


def test_emmet_conforms(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(EMMETHyperParams, layers=[1, 2], mom2_update_weight=10.0, emmet_lambda=0.1, **CONFORMANCE)
    C0 = {layer: ctx.second_moments(lm, hp)[layer] for layer in hp.layers}

    def solve(K, R, layer, prior):  # emmet_main: D = K^T C^-1 K + lambda I; adj_k = (D^-1 K^T C^-1)^T
        C_inv = torch.inverse(hp.mom2_update_weight * C0[layer])
        D = K.T @ C_inv @ K + hp.emmet_lambda * torch.eye(K.shape[1], dtype=K.dtype)
        return R @ (torch.inverse(D) @ K.T @ C_inv)

    _check_batch(lm, ctx, hp, apply_emmet, solve)


def test_alphaedit_conforms(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(AlphaEditHyperParams, layers=[1], L2=1.0, **CONFORMANCE)
    C0 = ctx.second_moments(lm, hp)[1]
    U, S, _ = torch.linalg.svd(C0)  # AlphaEdit's projection from the SVD of the covariance
    # a cut between two eigenvalues, below the middle of the spectrum: a null space of ~half of it
    hp = dataclasses.replace(hp, nullspace_threshold=float(S[len(S) // 2 - 1] + S[len(S) // 2]) / 2)
    P = U[:, S < hp.nullspace_threshold] @ U[:, S < hp.nullspace_threshold].T
    assert 0 < int((S < hp.nullspace_threshold).sum()) < len(S)

    def solve(K, R, layer, prior):  # solve(P (K K^T + cache_c) + L2 I, P K R^T)^T
        cache_c = torch.zeros_like(C0) if prior is None else prior
        eye = torch.eye(len(C0), dtype=C0.dtype)
        return torch.linalg.solve(P @ (K @ K.T + cache_c) + hp.L2 * eye, P @ K @ R.T).T

    _check_batch(lm, ctx, hp, apply_alphaedit, solve, n_batches=2, cache_keys=True)


def test_encore_conforms(tiny64, tmp_path):
    lm, ctx = tiny64, context(tmp_path)
    hp = tiny_hparams(ENCOREHyperParams, layers=[1], mom2_update_weight=20.0, update_norm_lambda=5.0, **CONFORMANCE)
    C0 = ctx.second_moments(lm, hp)[1]

    def solve(K, R, layer, prior):  # Delta = R K^T (lambda C0 + mu I + K_p K_p^T + K K^T)^-1
        eye = torch.eye(len(C0), dtype=C0.dtype)
        A = hp.mom2_update_weight * C0 + hp.update_norm_lambda * eye + (0 if prior is None else prior) + K @ K.T
        return torch.linalg.solve(A, K @ R.T).T

    _check_batch(lm, ctx, hp, apply_encore, solve, n_batches=2, cache_keys=True)
