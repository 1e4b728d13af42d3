"""Values: optimise, per request, a delta added to the residual stream at the fact token of the
edited layer, so that target_new becomes likely after every templated prompt.

Loss per request (the papers' form):
    mean over templated prompts of the target's mean token NLL
  + kl_factor * KL(new || original) of the next-token distribution after "{subject} is a"
  + v_weight_decay * ||delta|| / ||reference||^2,
with ||delta|| clamped to clamp_norm_factor * ||reference||. The reference vector is the output
being edited at the bare prompt's fact token: the down projection's output (ROME, site "mlp") or
the layer's output (MEMIT-style, site "layer"); the target value is reference + delta.

All requests are optimised together: one batched forward/backward per step, each request its own
delta and its own Adam state, a request leaving the batch once its loss is below the threshold.

Fast path (default): the layers up to the edited one do not depend on the delta, so they run once
without grad; each step runs only the layers above it, and the unembedding is applied only at the
positions whose log-probabilities the loss reads. `fast=False` is the straightforward path (full
model forward with a hook, full logits), kept to check equality and measure the speed-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rome.compute_u import templated_prompts
from rome.hparams import EditHyperParams
from util.models import LoadedModel, input_device
from util.nethook import StopForward, Trace, add_to_output, hidden_of
from util.errors import RequestError
from util.requests import EditRequest
from util.tokens import encode_with_target, right_pad, subject_position


@dataclass
class ValueResult:
    delta: torch.Tensor  # (n, d) float32, the optimised residual change
    reference: torch.Tensor  # (n, d) float64, the edited output at the bare prompt before editing
    steps: list[int]  # optimiser updates taken per request
    final_loss: list[float]
    target_prob: list[float]  # mean over templated prompts of exp(-mean token NLL)
    delta_ratio: list[float]  # ||delta|| / ||reference||

    @property
    def target(self) -> torch.Tensor:
        return self.reference + self.delta


@dataclass
class _Batch:
    """Rewrite sequences (templated prompt + target minus its last token) and KL sequences."""
    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor
    request_of_row: torch.Tensor  # (B,)
    fact_position: torch.Tensor  # (B,) where the delta is added
    is_rewrite: torch.Tensor  # (B,) bool; the others are KL rows
    bare_row: torch.Tensor  # (n,) the row of each request's bare rewrite prompt
    last_position: torch.Tensor  # (B,) last real token (KL rows read it)
    target_row: torch.Tensor  # (n_tokens,) per target token: its row,
    target_position: torch.Tensor  # the position predicting it,
    target_token: torch.Tensor  # its id,
    target_share: torch.Tensor  # and 1 / (target tokens of its prompt)
    n_prompts: int  # templated rewrite prompts per request


def build_batch(lm: LoadedModel, requests: list[EditRequest], templates: list[str], fact_token, kl_prompts: list[str]) -> _Batch:
    seqs, request_of_row, fact, rewrite, bare = [], [], [], [], []
    t_row, t_pos, t_tok, t_share = [], [], [], []
    for i, request in enumerate(requests):
        bare.append(len(seqs))
        for prompt in templated_prompts(request, templates):
            text = prompt.format(request.subject)
            full, start = encode_with_target(lm.tok, text, request.target_new)
            prefix, position = subject_position(lm.tok, prompt, request.subject, fact_token)
            if fact_token == "last":
                position = start - 1
            elif full[: position + 1] != prefix[: position + 1]:
                raise RequestError(f"{request.label()}: tokenisation of {text!r} changes when the target is appended")
            for j in range(start, len(full)):
                t_row.append(len(seqs))
                t_pos.append(j - 1)
                t_tok.append(full[j])
                t_share.append(1.0 / (len(full) - start))
            seqs.append(full[:-1])
            fact.append(position)
            rewrite.append(True)
            request_of_row.append(i)
        for kl_prompt in kl_prompts:
            ids, position = subject_position(lm.tok, kl_prompt, request.subject, fact_token)
            seqs.append(ids)
            fact.append(position)
            rewrite.append(False)
            request_of_row.append(i)
    ids, mask = right_pad(seqs, lm.tok.pad_token_id)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return _Batch(
        ids, mask, long(request_of_row), long(fact), torch.tensor(rewrite), long(bare), mask.sum(1) - 1,
        long(t_row), long(t_pos), long(t_tok), torch.tensor(t_share), len(templates),
    )


class _Active:
    """Index tensors for the requests still being optimised (rows renumbered locally)."""

    def __init__(self, batch: _Batch, active: list[int], n_requests: int):
        request_local = torch.full((n_requests,), -1, dtype=torch.long)
        request_local[active] = torch.arange(len(active))
        self.requests = torch.tensor(active, dtype=torch.long)
        self.rows = torch.nonzero(request_local[batch.request_of_row] >= 0)[:, 0]
        row_local = torch.full((len(batch.ids),), -1, dtype=torch.long)
        row_local[self.rows] = torch.arange(len(self.rows))
        self.row_request = request_local[batch.request_of_row[self.rows]]
        self.fact = batch.fact_position[self.rows]
        rewrite = batch.is_rewrite[self.rows]
        self.rewrite_rows = torch.nonzero(rewrite)[:, 0]
        self.kl_rows = torch.nonzero(~rewrite)[:, 0]
        self.kl_positions = batch.last_position[self.rows][self.kl_rows]
        self.kl_original = self.rows[self.kl_rows]  # original row numbers: keys of the KL reference
        keep = row_local[batch.target_row] >= 0
        self.t_row = row_local[batch.target_row[keep]]
        self.t_position = batch.target_position[keep]
        self.t_token = batch.target_token[keep]
        self.t_share = batch.target_share[keep]


def _select_rows(value, rows: torch.Tensor, batch_size: int):
    """Keep `rows` of every batch-shaped tensor inside captured layer arguments.

    Batch-shaped = at least 2-D with leading size `batch_size`; 1-D tensors (cache positions) and
    broadcast tensors (leading size 1) are shared by all rows and kept whole."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_size and batch_size > 1:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, rows, batch_size) for v in value)
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, batch_size) for k, v in value.items()}
    return value


class _UpperStack:
    """The layers above the edited one, replayed with the arguments the model passed them in one
    unedited forward (their inputs below the edited layer never change)."""

    def __init__(self, lm: LoadedModel, layer: int, loss_layer: int, batch: _Batch):
        self.lm = lm
        self.modules = [lm.model.get_submodule(lm.arch.layer(j)) for j in range(layer + 1, loss_layer + 1)]
        self.calls: list[tuple[tuple, dict]] = []
        handles = [m.register_forward_pre_hook(self._capture, with_kwargs=True) for m in self.modules]
        device = input_device(lm.model)
        try:
            with torch.no_grad(), Trace(lm.model, lm.arch.layer(layer), stop=not self.modules) as base:
                lm.model(input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device), use_cache=False)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.hidden = base.output  # (B, T, d): the edited layer's output before any delta
        self.batch_size = len(batch.ids)
        self.active_calls = self.calls
        self.active_hidden = self.hidden

    def _capture(self, module, args, kwargs):
        self.calls.append((args, kwargs))
        if len(self.calls) == len(self.modules):
            raise StopForward("captured the inputs of every upper layer")

    def restrict(self, rows: torch.Tensor) -> None:
        """Replay only `rows` from now on (requests that finished leave the batch)."""
        self.active_hidden = self.hidden.index_select(0, rows.to(self.hidden.device))
        self.active_calls = [_select_rows(call, rows, self.batch_size) for call in self.calls]

    def __call__(self, added: torch.Tensor) -> torch.Tensor:
        """Hidden states at the loss layer with `added` summed into the edited layer's output."""
        hidden = self.active_hidden + added
        for module, (args, kwargs) in zip(self.modules, self.active_calls):
            if args:
                out = module(hidden, *args[1:], **kwargs)
            else:
                out = module(**{**kwargs, "hidden_states": hidden})
            hidden = hidden_of(out)
        return hidden


def _log_probs(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    norm = lm.model.get_submodule(lm.arch.final_norm)
    unembed = lm.model.get_submodule(lm.arch.unembed)
    return torch.log_softmax(unembed(norm(hidden)).float(), dim=-1)


def _scatter_delta(hidden_like: torch.Tensor, view: _Active, delta_stack: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the active rows' hidden states, holding each row's delta at its fact
    token and zeros elsewhere."""
    device = hidden_like.device
    rows = torch.arange(len(view.rows), device=device)
    values = delta_stack[view.row_request.to(delta_stack.device)].to(device, hidden_like.dtype)
    return torch.zeros_like(hidden_like).index_put((rows, view.fact.to(device)), values)


def _fast_log_probs(lm, stack: _UpperStack, view: _Active, delta_stack):
    top = stack(_scatter_delta(stack.active_hidden, view, delta_stack))
    device = top.device
    targets = _log_probs(lm, top[view.t_row.to(device), view.t_position.to(device)])
    kl = _log_probs(lm, top[view.kl_rows.to(device), view.kl_positions.to(device)])
    return targets, kl


def _full_log_probs(lm, batch: _Batch, layer: int, view: _Active, delta_stack):
    device = input_device(lm.model)
    with Trace(lm.model, lm.arch.layer(layer), edit_output=add_to_output(lambda h: _scatter_delta(h, view, delta_stack))):
        logits = lm.model(input_ids=batch.ids[view.rows].to(device), attention_mask=batch.mask[view.rows].to(device), use_cache=False).logits
    all_lp = torch.log_softmax(logits.float(), dim=-1)
    device = all_lp.device
    return all_lp[view.t_row.to(device), view.t_position.to(device)], all_lp[view.kl_rows.to(device), view.kl_positions.to(device)]


def _per_request(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, owner.to(values.device), values)


def compute_values(
    lm: LoadedModel,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hparams: EditHyperParams,
    site: str = "mlp",
    fast: bool = True,
) -> ValueResult:
    """Optimise one delta per request at `layer` (see the module docstring)."""
    batch = build_batch(lm, requests, templates, hparams.fact_token, hparams.kl_prompts)
    n = len(requests)
    reference = _reference_vectors(lm, batch, lm.arch.down_proj(layer) if site == "mlp" else lm.arch.layer(layer))
    ref_norm = reference.norm(dim=-1)
    stack = _UpperStack(lm, layer, hparams.v_loss_layer, batch) if fast else None
    device = stack.hidden.device if fast else reference.device
    deltas = [torch.nn.Parameter(torch.zeros(reference.shape[1], device=device)) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    steps, final_loss, target_prob = [0] * n, [float("nan")] * n, [float("nan")] * n
    active, view, kl_reference = list(range(n)), _Active(batch, list(range(n)), n), None

    for step in range(hparams.v_num_grad_steps):
        delta_stack = torch.stack([deltas[i] for i in active])
        if fast:
            target_lp, kl_lp = _fast_log_probs(lm, stack, view, delta_stack)
        else:
            target_lp, kl_lp = _full_log_probs(lm, batch, layer, view, delta_stack)
        if kl_reference is None:  # first step: delta = 0, the original distribution
            kl_reference = dict(zip(view.kl_original.tolist(), kl_lp.detach()))
        loss, prob = _loss(hparams, batch, view, target_lp, kl_lp, kl_reference, delta_stack, ref_norm[view.requests].to(device), len(active))
        done = [False] * len(active)
        for k, i in enumerate(active):
            final_loss[i], target_prob[i] = loss[k].item(), prob[k].item()
            done[k] = final_loss[i] < hparams.v_loss_threshold or step == hparams.v_num_grad_steps - 1
        if all(done):
            break
        optimizer.zero_grad(set_to_none=True)
        loss[~torch.tensor(done, device=loss.device)].sum().backward()
        optimizer.step()  # finished requests have no gradient, so Adam leaves them alone
        if any(done):
            active = [i for k, i in enumerate(active) if not done[k]]
            view = _Active(batch, active, n)
            if fast:
                stack.restrict(view.rows)
        with torch.no_grad():
            for i in active:
                steps[i] += 1
                limit = hparams.clamp_norm_factor * ref_norm[i]
                if deltas[i].norm() > limit:
                    deltas[i].mul_(limit / deltas[i].norm())

    delta = torch.stack([d.detach().float().cpu() for d in deltas])
    reference = reference.cpu()
    return ValueResult(delta, reference, steps, final_loss, target_prob, (delta.norm(dim=-1) / reference.norm(dim=-1)).tolist())


@torch.no_grad()
def _reference_vectors(lm: LoadedModel, batch: _Batch, module: str) -> torch.Tensor:
    """The edited output at each bare prompt's fact token, before editing."""
    device = input_device(lm.model)
    rows = batch.bare_row
    with Trace(lm.model, module, stop=True) as trace:
        lm.model(input_ids=batch.ids[rows].to(device), attention_mask=batch.mask[rows].to(device), use_cache=False)
    out = trace.output
    return out[torch.arange(len(rows), device=out.device), batch.fact_position[rows].to(out.device)].double()


def _loss(hparams, batch, view: _Active, target_lp, kl_lp, kl_reference, delta_stack, ref_norm, n_active):
    """Per active request: loss (differentiable) and mean target probability over its prompts."""
    device = target_lp.device
    token_nll = -target_lp.gather(1, view.t_token.to(device)[:, None])[:, 0]
    prompt_nll = _per_request(token_nll * view.t_share.to(device), view.t_row, len(view.rows))
    rewrite = view.rewrite_rows.to(device)
    owners = view.row_request[view.rewrite_rows]
    nll = _per_request(prompt_nll[rewrite], owners, n_active) / batch.n_prompts
    prob = _per_request(torch.exp(-prompt_nll[rewrite]).detach(), owners, n_active) / batch.n_prompts
    reference = torch.stack([kl_reference[r] for r in view.kl_original.tolist()]).to(kl_lp.device)
    kl_each = (kl_lp.exp() * (kl_lp - reference)).sum(-1)  # KL(new || original)
    kl_owners = view.row_request[view.kl_rows]
    kl = _per_request(kl_each, kl_owners, n_active) / _per_request(torch.ones_like(kl_each), kl_owners, n_active).clamp(min=1)
    # The papers' weight decay: ||delta|| / ||reference||^2 (not squared in ||delta||).
    decay = hparams.v_weight_decay * delta_stack.norm(dim=-1) / ref_norm**2
    return nll + hparams.kl_factor * kl.to(device) + decay.to(device), prob
