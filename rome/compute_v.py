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
delta (a row of one matrix) and its own Adam state (`RowAdam`), a request stopping once its loss
is below the threshold or, with `v_argmax_stop_steps` > 0 (ENCORE's most-probable early
stopping), once every target token has been the top prediction after every templated prompt at
that many steps. Stopping is decided on the device; the host reads it every `sync_every` steps.

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

# Value steps between the host's reads of the stopping state on an accelerator: each read waits
# for the queued steps; a stopped request may be computed (not changed) up to this many steps more.
SYNC_EVERY = 4


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
    sync_every: int | None = None,
) -> ValueResult:
    """Optimise one delta per request at `layer` (see the module docstring).

    Requests are independent, so large batches are optimised in chunks of `chunk_size` requests
    (bounded memory) with results identical to one batch. `autocast` (fast path only, e.g.
    torch.bfloat16) runs the replayed layers in mixed precision: several times faster on CPUs
    with native bfloat16 matmuls, at the cost of values that are no longer bitwise those of
    float32 (the deltas and Adam stay float32). `compiled` (with `autocast`, Llama models): the
    replayed layers run torch.compile'd (compiled once per `runtime`; values close to, not equal
    to, the eager ones). `runtime`: what replays keep across calls (EditContext.replay); without
    one, a runtime lives for this call only. `sync_every`: steps between the host's reads of which
    requests still run (None: every step on a CPU, where a read costs nothing and stopped rows
    leave soonest; SYNC_EVERY on an accelerator); the results do not depend on it."""
    if runtime is None:
        runtime = ReplayRuntime()
        try:
            return compute_values(lm, requests, layer, templates, hparams, site, fast, chunk_size, autocast, compiled, runtime, sync_every)
        finally:
            runtime.close()
    if len(requests) > chunk_size:
        parts = [compute_values(lm, requests[i:i + chunk_size], layer, templates, hparams, site, fast, chunk_size, autocast, compiled, runtime,
                                sync_every)
                 for i in range(0, len(requests), chunk_size)]
        return ValueResult(
            torch.cat([p.delta for p in parts]), torch.cat([p.reference for p in parts]),
            *(sum((getattr(p, name) for p in parts), []) for name in ("steps", "final_loss", "target_prob", "delta_ratio")),
        )
    batch = build_batch(lm, requests, templates, hparams.fact_token, hparams.kl_prompts, hparams.kl_position)
    replay = make_replay(lm, batch, layer, hparams.v_loss_layer, runtime=runtime, fast=fast, autocast=autocast, compiled=compiled)
    return _optimise(lm, batch, replay, lm.arch.site(layer, site), hparams, sync_every)


def _optimise(lm: LoadedModel, batch: Batch, replay: Replay, site_module: str, hparams: EditHyperParams,
              sync_every: int | None = None) -> ValueResult:
    """The optimisation of one batch's deltas, each step's log-probabilities from `replay`.

    The stopping rules are decided on the device, and a stopped request's row is frozen there (no
    update, no Adam moment change); the host reads which requests still run only every
    `sync_every` steps (and at the last), to break off and to drop stopped rows from the replay.
    So between reads a GPU queues steps without waiting, and the results do not depend on
    `sync_every`: a stopped row is computed but neither read nor changed until it leaves."""
    n = len(batch.bare_row)
    reference = _reference_vectors(lm, batch, site_module)
    ref_norm = reference.norm(dim=-1)
    device = reference.device  # the edited layer's output device, where the replays add the deltas
    sync_every = sync_every or (1 if device.type == "cpu" else SYNC_EVERY)
    # float32 deltas for half-precision models, float64 for float64 models (exactness tests)
    param_dtype = torch.promote_types(next(lm.model.parameters()).dtype, torch.float32)
    values = torch.zeros(n, reference.shape[1], device=device, dtype=param_dtype)  # request k's delta: row k
    adam = RowAdam(values, hparams.v_lr)  # moments shaped like `values`
    limits = (hparams.clamp_norm_factor * ref_norm).to(device)
    final_loss, target_prob = (torch.full((n,), float("nan"), dtype=torch.float64, device=device) for _ in range(2))
    steps, argmax_steps = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(2))  # updates; steps on top (MPES)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    active, kl_reference = list(range(n)), None  # active: the requests still in the replay, ascending
    view, rows = Active(batch, active, n), torch.arange(n, device=device)

    for step in range(hparams.v_num_grad_steps):
        delta_stack = values[rows].requires_grad_()
        target_lp, kl_lp = replay(delta_stack, view)
        if kl_reference is None:  # first step: delta = 0, the original distribution
            kl_reference = dict(zip(view.kl_original.tolist(), kl_lp.detach()))
        loss, prob = _loss(hparams, batch, view, target_lp, kl_lp, kl_reference, delta_stack, ref_norm[rows], len(active))
        running = alive[rows]
        losses = loss.detach().double()  # compared in float64, as the recorded value
        final_loss[rows] = torch.where(running, losses, final_loss[rows])
        target_prob[rows] = torch.where(running, prob.double(), target_prob[rows])
        if hparams.v_argmax_stop_steps:
            argmax_steps[rows] += running & _targets_on_top(view, target_lp, len(active))
        stop = (losses < hparams.v_loss_threshold) | (step == hparams.v_num_grad_steps - 1)
        if hparams.v_argmax_stop_steps:
            stop |= argmax_steps[rows] >= hparams.v_argmax_stop_steps
        live = running & ~stop
        read = (step + 1) % sync_every == 0 or step == hparams.v_num_grad_steps - 1
        live_now = live.tolist() if read else None  # the one host sync, every sync_every steps
        if read and not any(live_now):
            break
        torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
        current = delta_stack.detach()  # values[rows], gathered once per step
        updated = adam.step(rows, current, delta_stack.grad, live, step + 1)
        updated = updated * _clamp_scales(updated, limits[rows]).to(updated.dtype)[:, None]
        values[rows] = torch.where(live[:, None], updated, current)
        alive[rows] = live
        steps[rows] += live
        if read and not all(live_now):
            active = [i for i, keep in zip(active, live_now) if keep]
            view, rows = Active(batch, active, n), torch.tensor(active, device=device)
            replay = replay.only(view)

    delta, reference = values.cpu(), reference.cpu()
    return ValueResult(delta, reference, steps.tolist(), final_loss.tolist(), target_prob.tolist(),
                       (delta.norm(dim=-1) / reference.norm(dim=-1)).tolist())


class RowAdam:
    """torch.optim.Adam (its defaults) over the rows of one matrix, each row a request's delta
    with its own moments. A row not `live` keeps its value and moments, as Adam leaves a
    parameter without gradient; live rows have all been updated at every step so far (a stopped
    request never resumes), so one step count serves them. Elementwise the same operations as
    torch's Adam (single-tensor and foreach), one kernel each for the whole batch."""

    def __init__(self, values: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(values), torch.zeros_like(values)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, current: torch.Tensor, grad: torch.Tensor, live: torch.Tensor, count: int) -> torch.Tensor:
        """The values of `rows` (now `current`) after update number `count`, returned, not written
        anywhere; the moments of live rows are written back."""
        beta1, beta2 = self.betas
        exp_avg = self.exp_avg[rows].lerp_(grad, 1 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        keep = live[:, None]
        self.exp_avg[rows] = torch.where(keep, exp_avg, self.exp_avg[rows])
        self.exp_avg_sq[rows] = torch.where(keep, exp_avg_sq, self.exp_avg_sq[rows])
        bias_correction1, bias_correction2 = 1 - beta1 ** float(count), 1 - beta2 ** float(count)
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
        return torch.addcdiv(current, exp_avg, denom, value=-(self.lr / bias_correction1))


def _clamp_scales(deltas: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Per row, the factor that brings ||delta|| down to its limit: exactly 1 within it, so that
    such rows stay bitwise unchanged."""
    norms = deltas.norm(dim=-1)
    limits = limits.to(norms.device)
    return torch.where(norms > limits, limits / norms, torch.ones_like(limits))


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
    on = view.on(target_lp.device)
    wrong = (target_lp.argmax(-1) != on.t_token).double()
    per_row = _per_request(wrong, on.t_row, len(view.rows))
    return _per_request(per_row, on.row_request, n_active) == 0


def _loss(hparams, batch, view: Active, target_lp, kl_lp, kl_reference, delta_stack, ref_norm, n_active):
    """Per active request: loss (differentiable) and mean target probability over its prompts."""
    device = target_lp.device
    on = view.on(device)  # index tensors already on the device: no copy (and wait) per step
    token_nll = -target_lp.gather(1, on.t_token[:, None])[:, 0]
    prompt_nll = _per_request(token_nll * on.t_share, on.t_row, len(view.rows))
    nll = _per_request(prompt_nll[on.rewrite_rows], on.rewrite_owner, n_active) / batch.n_prompts
    prob = _per_request(torch.exp(-prompt_nll[on.rewrite_rows]).detach(), on.rewrite_owner, n_active) / batch.n_prompts
    reference = torch.stack([kl_reference[r] for r in view.kl_original.tolist()]).to(kl_lp.device)
    kl_each = (kl_lp.exp() * (kl_lp - reference)).sum(-1)  # KL(new || original)
    kl_owner = on.kl_owner.to(kl_each.device)
    kl = _per_request(kl_each, kl_owner, n_active) / _per_request(torch.ones_like(kl_each), kl_owner, n_active).clamp(min=1)
    # The papers' weight decay: ||delta|| / ||reference||^2 (not squared in ||delta||).
    decay = hparams.v_weight_decay * delta_stack.norm(dim=-1) / ref_norm**2
    return nll + hparams.kl_factor * kl.to(device) + decay.to(device), prob
