"""Values: optimise, per request, a delta added to the residual stream at the fact token of the
edited layer, so that target_new becomes likely after every templated prompt.

Loss per request (the papers' form):
    mean over templated prompts of the target's mean token NLL
  + kl_factor * KL(new || original) of the next-token distribution of "{subject} is a" read at
    its fact token (the reference code's lookup index; `kl_position: prompt_end`: after "a")
  + v_weight_decay * ||delta|| / ||reference||^2
  (+ true_penalty * mean over templated prompts of P(target_true), exp(-mean token NLL): not in
    the papers, off unless ValueSettings.true_penalty is set),
with ||delta|| clamped to clamp_norm_factor * ||reference||. The reference vector is the output
being edited at the bare prompt's fact token: the down projection's output (ROME, site "mlp") or
the layer's output (MEMIT-style, site "layer"); the target value is reference + delta.

The loss reads data: the batch (rome/values/layout.py) holds one table of reads (row, position,
kind, token, weight, owner), a replay returns the log-probabilities at every read, and `_loss`
takes each term's reads by kind. A new term is a new kind of read in the layout and a term here.

All requests are optimised together: one batched forward/backward per step, each request its own
delta (a row of one matrix) and its own Adam state (rome/values/adam.py), a request stopping once
its loss is below the threshold or, with `v_argmax_stop_steps` > 0 (ENCORE's most-probable early
stopping), once every target token has been the top prediction after every templated prompt at
that many steps. Stopping is decided on the device; the host reads it every `sync_every` steps.

Each step's log-probabilities come from a replay (rome/values/replay.py), chosen once. The fast
path (default) is fast because the layers up to the edited one do not depend on the delta: they
run once without grad, and each step runs only the layers above it, only on the positions from
the fact token on, with the unembedding only where the loss reads; rows are grouped by length so
that batching requests adds no padding work. Under mixed precision, plain Llama layers run as one
function that torch.compile can fuse (`compiled`). `fast=False` is the straightforward path (full
model forward with a hook, full logits), kept to check equality and measure the speed-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rome.hparams import EditHyperParams
from rome.values.adam import RowAdam, clamp_scales
from rome.values.layout import KL, PAPERS_KINDS, TARGET, TRUE, Batch, View, build_batch
from rome.values.replay import Replay, ReplayRuntime, make_replay
from util.models import LoadedModel, input_device
from util.nethook import Trace
from util.requests import EditRequest

# Value steps between the host's reads of the stopping state on an accelerator: each read waits
# for the queued steps; a stopped request may be computed (not changed) up to this many steps more.
SYNC_EVERY = 4


@dataclass(frozen=True)
class ValueSettings:
    """How the optimisation runs (EditContext.value_settings gives a run's); the values depend on
    none of it but `fast` and `autocast` (and `compiled`), and on those only to rounding.

    chunk_size: requests per batch (bounded memory; results identical to one batch). autocast
    (fast path only, e.g. torch.bfloat16): the replayed layers in mixed precision, several times
    faster on CPUs with native bfloat16 matmuls (the deltas and Adam stay float32). compiled (with
    autocast, Llama models): the replayed layers torch.compile'd, once per ReplayRuntime.
    sync_every: steps between the host's reads of which requests still run (None: every step on a
    CPU, where a read costs nothing and stopped rows leave soonest; SYNC_EVERY on an accelerator).
    true_penalty: the weight of a term pushing target_true's probability down (0: off)."""
    fast: bool = True
    chunk_size: int = 64
    autocast: torch.dtype | None = None
    compiled: bool = False
    sync_every: int | None = None
    true_penalty: float = 0.0

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of read the loss takes (rome/values/layout.py builds those rows)."""
        return PAPERS_KINDS + ((TRUE,) if self.true_penalty else ())


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

    def row(self, j: int) -> "ValueResult":
        """Request j's alone (n = 1)."""
        return ValueResult(self.delta[j:j + 1], self.reference[j:j + 1], *([getattr(self, name)[j]] for name in
                                                                              ("steps", "final_loss", "target_prob", "delta_ratio")))

    @staticmethod
    def joined(parts: list["ValueResult"]) -> "ValueResult":
        if len(parts) == 1:
            return parts[0]
        return ValueResult(
            torch.cat([p.delta for p in parts]), torch.cat([p.reference for p in parts]),
            *(sum((getattr(p, name) for p in parts), []) for name in ("steps", "final_loss", "target_prob", "delta_ratio")),
        )


def compute_values(lm: LoadedModel, requests: list[EditRequest], layer: int, templates: list[str], hparams: EditHyperParams,
                   site: str = "mlp", settings: ValueSettings = ValueSettings(), runtime: ReplayRuntime | None = None) -> ValueResult:
    """Optimise one delta per request at `layer` (see the module docstring), the requests' rows laid
    out here (optimise_values: for a batch laid out already)."""
    return optimise_values(lm, build_batch(lm, requests, templates, hparams, settings.kinds), layer, hparams, site, settings, runtime)


def optimise_values(lm: LoadedModel, batch: Batch, layer: int, hparams: EditHyperParams, site: str = "mlp",
                    settings: ValueSettings = ValueSettings(), runtime: ReplayRuntime | None = None) -> ValueResult:
    """The deltas of `batch`'s requests, in chunks of settings.chunk_size requests. `runtime`: what
    replays keep across calls (EditContext.replay); without one, a runtime lives for this call only."""
    if runtime is None:
        with ReplayRuntime() as runtime:
            return optimise_values(lm, batch, layer, hparams, site, settings, runtime)
    n, size = batch.n_requests, settings.chunk_size
    chunks = [batch] if n <= size else [batch.chunk(i, min(i + size, n)) for i in range(0, n, size)]
    module = lm.arch.site(layer, site)
    replay = lambda chunk: make_replay(lm, chunk, layer, hparams.v_loss_layer, runtime=runtime, fast=settings.fast,  # noqa: E731
                                       autocast=settings.autocast, compiled=settings.compiled)
    return ValueResult.joined([_optimise(lm, chunk, replay(chunk), module, hparams, settings) for chunk in chunks])


def _optimise(lm: LoadedModel, batch: Batch, replay: Replay, site_module: str, hparams: EditHyperParams,
              settings: ValueSettings) -> ValueResult:
    """The optimisation of one batch's deltas, each step's log-probabilities from `replay`.

    The stopping rules are decided on the device, and a stopped request's row is frozen there (no
    update, no Adam moment change); the host reads which requests still run only every
    `sync_every` steps (and at the last), to break off and to drop stopped rows from the replay.
    So between reads a GPU queues steps without waiting, and the results do not depend on
    `sync_every`: a stopped row is computed but neither read nor changed until it leaves."""
    n = batch.n_requests
    reference = _reference_vectors(lm, batch, site_module)
    ref_norm = reference.norm(dim=-1)
    device = reference.device  # the edited layer's output device, where the replays add the deltas
    sync_every = settings.sync_every or (1 if device.type == "cpu" else SYNC_EVERY)
    # float32 deltas for half-precision models, float64 for float64 models (exactness tests)
    values = torch.zeros(n, reference.shape[1], device=device, dtype=torch.promote_types(next(lm.model.parameters()).dtype, torch.float32))
    adam = RowAdam(values, hparams.v_lr)  # moments shaped like `values`: request k's delta is row k
    limits = (hparams.clamp_norm_factor * ref_norm).to(device)
    progress = _Progress(n, device, hparams)
    view, rows, kl_reference = View(batch, list(range(n))), torch.arange(n, device=device), None
    for step in range(hparams.v_num_grad_steps):
        delta_stack = values[rows].requires_grad_()
        log_probs = replay(delta_stack, view)
        if kl_reference is None:  # first step: delta = 0, the original distributions
            kl_reference = log_probs[view.spans[KL]].detach().clone()
        loss, prob = _loss(hparams, batch, view, log_probs, kl_reference, delta_stack, ref_norm[rows], settings.true_penalty)
        live = progress.update(step, rows, loss, prob, lambda: _targets_on_top(view, log_probs))
        read = (step + 1) % sync_every == 0 or step == hparams.v_num_grad_steps - 1
        live_now = live.tolist() if read else None  # the one host sync, every sync_every steps
        if read and not any(live_now):
            break
        torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
        current = delta_stack.detach()  # values[rows], gathered once per step
        updated = adam.step(rows, current, delta_stack.grad, live, step + 1)
        updated = updated * clamp_scales(updated, limits[rows]).to(updated.dtype)[:, None]
        values[rows] = torch.where(live[:, None], updated, current)
        progress.advance(rows, live)
        if read and not all(live_now):
            active = [i for i, keep in zip(view.requests.tolist(), live_now) if keep]
            view, rows = View(batch, active), torch.tensor(active, device=device)
            replay = replay.only(view)
    delta, reference = values.cpu(), reference.cpu()
    return ValueResult(delta, reference, progress.steps.tolist(), progress.final_loss.tolist(), progress.target_prob.tolist(),
                       (delta.norm(dim=-1) / reference.norm(dim=-1)).tolist())


class _Progress:
    """Per request, on the device: the loss and target probability at its last step, its updates,
    the steps it had every target on top (ENCORE's MPES), and whether it still runs."""

    def __init__(self, n: int, device: torch.device, hparams: EditHyperParams):
        self.hparams = hparams
        self.final_loss, self.target_prob = (torch.full((n,), float("nan"), dtype=torch.float64, device=device) for _ in range(2))
        self.steps, self.argmax_steps = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(2))
        self.alive = torch.ones(n, dtype=torch.bool, device=device)

    def update(self, step: int, rows: torch.Tensor, loss: torch.Tensor, prob: torch.Tensor, on_top) -> torch.Tensor:
        """Record this step of `rows` (those still running) and return which of them go on."""
        hp, running = self.hparams, self.alive[rows]
        losses = loss.detach().double()  # compared in float64, as the recorded value
        self.final_loss[rows] = torch.where(running, losses, self.final_loss[rows])
        self.target_prob[rows] = torch.where(running, prob.double(), self.target_prob[rows])
        if hp.v_argmax_stop_steps:
            self.argmax_steps[rows] += running & on_top()
        stop = (losses < hp.v_loss_threshold) | (step == hp.v_num_grad_steps - 1)
        if hp.v_argmax_stop_steps:
            stop |= self.argmax_steps[rows] >= hp.v_argmax_stop_steps
        return running & ~stop

    def advance(self, rows: torch.Tensor, live: torch.Tensor) -> None:
        self.alive[rows] = live
        self.steps[rows] += live


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


def _prompt_nll(on: View, log_probs: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row with reads of `kind` (token reads): the mean NLL of its target's tokens, and its
    request."""
    span, reads = on.spans[kind], on.reads
    token_nll = -log_probs[span].gather(1, reads.token[span][:, None])[:, 0]
    per_row = _per_request(token_nll * reads.weight[span], reads.row[span], len(on.rows))
    rows, owners = on.read_rows[kind]
    return per_row[rows], owners


def _targets_on_top(view: View, log_probs: torch.Tensor) -> torch.Tensor:
    """Per active request: is every target token the argmax after every templated prompt?"""
    on = view.on(log_probs.device)
    span = on.spans[TARGET]
    wrong = (log_probs[span].argmax(-1) != on.reads.token[span]).double()
    per_row = _per_request(wrong, on.reads.row[span], len(view.rows))
    return _per_request(per_row, on.row_request, len(view)) == 0


def _loss(hparams: EditHyperParams, batch: Batch, view: View, log_probs: torch.Tensor, kl_reference: torch.Tensor,
          delta_stack: torch.Tensor, ref_norm: torch.Tensor, true_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per active request: loss (differentiable) and mean target probability over its prompts,
    each term from its kind of reads (`log_probs`: a replay's, at every read of `view`)."""
    device, n = log_probs.device, len(view)
    on = view.on(device)  # index tensors already on the device: no copy (and wait) per step
    prompt_nll, owners = _prompt_nll(on, log_probs, TARGET)
    nll = _per_request(prompt_nll, owners, n) / batch.n_prompts
    prob = _per_request(torch.exp(-prompt_nll).detach(), owners, n) / batch.n_prompts
    kl_lp, kl_owner = log_probs[on.spans[KL]], on.reads.owner[on.spans[KL]]
    kl_each = (kl_lp.exp() * (kl_lp - kl_reference[on.kl_reference])).sum(-1)  # KL(new || original)
    kl = _per_request(kl_each, kl_owner, n) / _per_request(torch.ones_like(kl_each), kl_owner, n).clamp(min=1)
    # The papers' weight decay: ||delta|| / ||reference||^2 (not squared in ||delta||).
    decay = hparams.v_weight_decay * delta_stack.norm(dim=-1) / ref_norm**2
    loss = nll + hparams.kl_factor * kl.to(device) + decay.to(device)
    if true_penalty:  # the mean probability of target_true over the request's prompts
        true_nll, true_owners = _prompt_nll(on, log_probs, TRUE)
        loss = loss + true_penalty * _per_request(torch.exp(-true_nll), true_owners, n) / batch.n_prompts
    return loss, prob
