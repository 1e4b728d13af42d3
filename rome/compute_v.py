"""Values: optimise, per request, a delta added to the residual stream at the fact token of the
edited layer, so that target_new becomes likely after every templated prompt.

Loss per request (the papers' form):
    mean over templated prompts of the target's mean token NLL
  + kl_factor * KL(new || original) of the next-token distribution of "{subject} is a" read at
    its fact token (the reference code's lookup index; `kl_position: prompt_end`: after "a")
  + v_weight_decay * ||delta|| / ||reference||^2,
with ||delta|| clamped to clamp_norm_factor * ||reference||. The reference vector is the output
being edited at the bare prompt's fact token: the down projection's output (ROME, site "mlp") or
the layer's output (MEMIT-style, site "layer"); the target value is reference + delta.

All requests are optimised together: one batched forward/backward per step, each request its own
delta and its own Adam state, a request leaving the batch once its loss is below the threshold
or, with `v_argmax_stop_steps` > 0 (ENCORE's most-probable early stopping), once every target
token has been the top prediction after every templated prompt at that many steps.

Each step's log-probabilities come from a replay (rome/replay.py), chosen once. The fast path
(default) is fast because the layers up to the edited one do not depend on the delta: they run
once without grad, and each step runs only the layers above it, only on the positions from the
fact token on, with the unembedding only where the loss reads; rows are grouped by length
(rome/batch_layout.py) so that batching requests adds no padding work. Under mixed precision,
plain Llama layers run as one function that torch.compile can fuse (`compiled`). `fast=False`
is the straightforward path (full model forward with a hook, full logits), kept to check
equality and measure the speed-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rome.batch_layout import Active, Batch, build_batch
from rome.hparams import EditHyperParams
from rome.replay import Replay, ReplayRuntime, make_replay
from util.models import LoadedModel, input_device
from util.nethook import Trace
from util.requests import EditRequest


@dataclass
class ValueResult:
    delta: torch.Tensor  # (n, d) float32 (float64 for a float64 model), the optimised residual change
    reference: torch.Tensor  # (n, d) float64, the edited output at the bare prompt before editing
    steps: list[int]  # optimiser updates taken per request
    final_loss: list[float]
    target_prob: list[float]  # mean over templated prompts of exp(-mean token NLL)
    delta_ratio: list[float]  # ||delta|| / ||reference||

    @property
    def target(self) -> torch.Tensor:
        return self.reference + self.delta


def compute_values(
    lm: LoadedModel,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hparams: EditHyperParams,
    site: str = "mlp",
    fast: bool = True,
    chunk_size: int = 64,
    autocast: torch.dtype | None = None,
    compiled: bool = False,
    runtime: ReplayRuntime | None = None,
) -> ValueResult:
    """Optimise one delta per request at `layer` (see the module docstring).

    Requests are independent, so large batches are optimised in chunks of `chunk_size` requests
    (bounded memory) with results identical to one batch. `autocast` (fast path only, e.g.
    torch.bfloat16) runs the replayed layers in mixed precision: several times faster on CPUs
    with native bfloat16 matmuls, at the cost of values that are no longer bitwise those of
    float32 (the deltas and Adam stay float32). `compiled` (with `autocast`, Llama models): the
    replayed layers run torch.compile'd (compiled once per `runtime`; values close to, not equal
    to, the eager ones). `runtime`: what replays keep across calls (EditContext.replay); without
    one, a runtime lives for this call only."""
    if runtime is None:
        runtime = ReplayRuntime()
        try:
            return compute_values(lm, requests, layer, templates, hparams, site, fast, chunk_size, autocast, compiled, runtime)
        finally:
            runtime.close()
    if len(requests) > chunk_size:
        parts = [compute_values(lm, requests[i:i + chunk_size], layer, templates, hparams, site, fast, chunk_size, autocast, compiled, runtime)
                 for i in range(0, len(requests), chunk_size)]
        return ValueResult(
            torch.cat([p.delta for p in parts]), torch.cat([p.reference for p in parts]),
            *(sum((getattr(p, name) for p in parts), []) for name in ("steps", "final_loss", "target_prob", "delta_ratio")),
        )
    batch = build_batch(lm, requests, templates, hparams.fact_token, hparams.kl_prompts, hparams.kl_position)
    replay = make_replay(lm, batch, layer, hparams.v_loss_layer, runtime=runtime, fast=fast, autocast=autocast, compiled=compiled)
    return _optimise(lm, batch, replay, lm.arch.down_proj(layer) if site == "mlp" else lm.arch.layer(layer), hparams)


def _optimise(lm: LoadedModel, batch: Batch, replay: Replay, site_module: str, hparams: EditHyperParams) -> ValueResult:
    """The optimisation of one batch's deltas, each step's log-probabilities from `replay`."""
    n = len(batch.bare_row)
    reference = _reference_vectors(lm, batch, site_module)
    ref_norm = reference.norm(dim=-1)
    device = reference.device  # the edited layer's output device, where the replays add the deltas
    # float32 deltas for half-precision models, float64 for float64 models (exactness tests)
    param_dtype = torch.promote_types(next(lm.model.parameters()).dtype, torch.float32)
    deltas = [torch.nn.Parameter(torch.zeros(reference.shape[1], device=device, dtype=param_dtype)) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    steps, final_loss, target_prob = [0] * n, [float("nan")] * n, [float("nan")] * n
    argmax_steps = [0] * n  # steps at which every target token was the argmax (MPES)
    active, kl_reference = list(range(n)), None  # active: the requests still optimised, ascending
    view = Active(batch, active, n)

    for step in range(hparams.v_num_grad_steps):
        delta_stack = torch.stack([deltas[i] for i in active])
        target_lp, kl_lp = replay(delta_stack, view)
        if kl_reference is None:  # first step: delta = 0, the original distribution
            kl_reference = dict(zip(view.kl_original.tolist(), kl_lp.detach()))
        loss, prob = _loss(hparams, batch, view, target_lp, kl_lp, kl_reference, delta_stack, ref_norm[view.requests].to(device), len(active))
        on_top = _targets_on_top(view, target_lp, len(active)) if hparams.v_argmax_stop_steps else torch.zeros_like(prob, dtype=torch.bool)
        # One host sync per step for the stopping rules (not one per request): float64 holds
        # float32 values exactly, so these are the numbers .item() would give.
        losses, probs, tops = torch.stack([loss.detach().double(), prob.double(), on_top.double()]).tolist()
        live = []
        for k, i in enumerate(active):
            final_loss[i], target_prob[i] = losses[k], probs[k]
            argmax_steps[i] += bool(tops[k])
            live.append(not (final_loss[i] < hparams.v_loss_threshold or step == hparams.v_num_grad_steps - 1
                             or 0 < hparams.v_argmax_stop_steps <= argmax_steps[i]))
        if not any(live):
            break
        optimizer.zero_grad(set_to_none=True)
        loss[torch.tensor(live, device=loss.device)].sum().backward()
        for k, i in enumerate(active):
            if not live[k]:  # a zero gradient would still move Adam's momentum; None skips the parameter
                deltas[i].grad = None
        optimizer.step()
        if not all(live):
            active = [i for k, i in enumerate(active) if live[k]]
            view = Active(batch, active, n)
            replay = replay.only(view)
        for i in active:
            steps[i] += 1
        _clamp([deltas[i] for i in active], hparams.clamp_norm_factor * ref_norm[active])

    delta = torch.stack([d.detach().cpu() for d in deltas])
    reference = reference.cpu()
    return ValueResult(delta, reference, steps, final_loss, target_prob, (delta.norm(dim=-1) / reference.norm(dim=-1)).tolist())


@torch.no_grad()
def _clamp(deltas: list[torch.Tensor], limits: torch.Tensor) -> None:
    """||delta|| <= limit, decided on the device (no sync per request): a factor of exactly 1
    leaves the deltas within the limit bitwise unchanged."""
    norms = torch.stack([delta.norm() for delta in deltas])
    limits = limits.to(norms.device)
    scales = torch.where(norms > limits, limits / norms, torch.ones_like(limits))
    for delta, scale in zip(deltas, scales):
        delta.mul_(scale)


@torch.no_grad()
def _reference_vectors(lm: LoadedModel, batch: Batch, module: str) -> torch.Tensor:
    """The edited output at each bare prompt's fact token, before editing."""
    device = input_device(lm.model)
    rows = batch.bare_row
    with Trace(lm.model, module, stop=True) as trace:
        lm.model(input_ids=batch.ids[rows].to(device), attention_mask=batch.mask[rows].to(device), use_cache=False)
    out = trace.output
    return out[torch.arange(len(rows), device=out.device), batch.fact_position[rows].to(out.device)].double()


def _per_request(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, owner.to(values.device), values)


def _targets_on_top(view: Active, target_lp: torch.Tensor, n_active: int) -> torch.Tensor:
    """Per active request: is every target token the argmax after every templated prompt?"""
    wrong = (target_lp.argmax(-1) != view.t_token.to(target_lp.device)).double()
    per_row = _per_request(wrong, view.t_row, len(view.rows))
    return _per_request(per_row, view.row_request, n_active) == 0


def _loss(hparams, batch, view: Active, target_lp, kl_lp, kl_reference, delta_stack, ref_norm, n_active):
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
