"""FT-L: fine-tuning of the edited layers' parameters under an L-infinity constraint, the baseline
of the ROME paper (kmeng01/rome, baselines/ft; Zhu et al. 2020's constrained fine-tuning):

    Adam on the tuned parameters theta (lr, weight decay as Adam's L2 term), for at most num_steps
    passes over the requests in chunks of batch_size:
        loss = mean over the chunk's requests of the request's target loss
        a step only while loss >= loss_threshold; after every chunk theta = clamp(theta, theta0 +- eps)
    stopping after a pass whose chunk losses average (weighted by chunk size) below loss_threshold.

The target loss (`objective`): "prompt_last" (FT-L, the reference's): the mean over the target's
tokens of -log p(token | prompt), every one read at the prompt's last position; "target_new"
(FT-M, ftm/): the teacher-forced mean per-token NLL of the target after the prompt.
theta0 is the parameters before this edit (in a sequential run: the edited model's), as in the
reference, whose optimiser also starts afresh at every edit. `site` says which parameters are
tuned at each layer, resolved through util/arch.py: the down projection's weight and bias (the
reference's rewrite_module_tmp) or the whole MLP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from rome.declaration import Editor
from rome.editor import EditContext, EditResult
from util.arch import site_parameters
from util.deltas import delta_records, snapshot
from util.hparams import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, check_layers_exist, layers_problem, out_of_range
from util.models import LoadedModel, input_device
from util.requests import EditRequest
from util.tokens import right_pad, target_reads

Objective = Literal["prompt_last", "target_new"]


@dataclass(frozen=True)
class FTHyperParams:
    layers: list[int]  # the layers whose `site` is tuned
    num_steps: int  # passes over the requests
    lr: float  # Adam's learning rate
    # L-infinity bound on each tuned entry's change from before the edit; None: unconstrained
    norm_constraint: float | None
    site: Literal["mlp", "mlp_down", "mlp_up", "mlp_gate"] = "mlp_down"  # util/arch.py SITES
    weight_decay: float = 0.0  # Adam's L2 term
    batch_size: int = 128  # requests per forward and step (the reference's default)
    objective: Objective = "prompt_last"  # fixed by each editor: FT-L prompt_last, FT-M target_new
    loss_threshold: float = 1e-2  # no step on a chunk below it; stop after a pass averaging below it

    def validate(self) -> str | None:
        problem = layers_problem(self.layers) or out_of_range(self, {
            "num_steps": AT_LEAST_ONE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": AT_LEAST_ONE,
            "loss_threshold": NON_NEGATIVE})
        if problem is None and self.norm_constraint is not None and not self.norm_constraint > 0:
            return f"key 'norm_constraint' must be a number > 0 or null (unconstrained), got {self.norm_constraint}"
        return problem

    def check_model(self, n_layers: int, source: str = "hparams") -> None:
        check_layers_exist(self.layers, n_layers, source)


@dataclass(frozen=True)
class Example:
    """One request as the loss reads it: the ids the model reads, and at which positions which
    target token's log-probability is taken (util.tokens.target_reads)."""
    ids: list[int]
    reads: list[int]
    targets: list[int]


def example(tok, request: EditRequest, objective: Objective) -> Example:
    return Example(*target_reads(tok, request.text, request.target_new, teacher_forced=objective == "target_new"))


def target_losses(lm: LoadedModel, examples: list[Example]) -> torch.Tensor:
    """Each example's mean -log p(target token) at its read positions, from one right-padded forward."""
    ids, mask = right_pad([e.ids for e in examples], lm.tok.pad_token_id)
    device = input_device(lm.model)
    logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    rows = torch.tensor([i for i, e in enumerate(examples) for _ in e.reads], device=device)
    columns = torch.tensor([p for e in examples for p in e.reads], device=device)
    tokens = torch.tensor([t for e in examples for t in e.targets], device=device)
    read = logits[rows, columns]
    log_probs = torch.log_softmax(read.to(torch.promote_types(read.dtype, torch.float32)), dim=-1)
    picked = log_probs.gather(1, tokens[:, None])[:, 0]
    sums = torch.zeros(len(examples), dtype=picked.dtype, device=device).index_add(0, rows, picked)
    counts = torch.tensor([len(e.targets) for e in examples], dtype=picked.dtype, device=device)
    return -sums / counts


@contextlib.contextmanager
def trainable(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` (and autograd on) for the block; their flags come back afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None


def tuned_params(lm: LoadedModel, hparams: FTHyperParams) -> list[str]:
    """Every parameter of `site` at the edited layers (util/arch.py), weights and biases."""
    return site_parameters(lm.model, lm.arch, hparams.site, hparams.layers)


def apply_ft(lm: LoadedModel, requests: list[EditRequest], hparams: FTHyperParams, ctx: EditContext) -> EditResult:
    names = tuned_params(lm, hparams)
    params = [lm.model.get_parameter(name) for name in names]
    originals = snapshot(lm.model, names)
    examples = [example(lm.tok, r, hparams.objective) for r in requests]
    chunks = [list(range(i, min(i + hparams.batch_size, len(examples)))) for i in range(0, len(examples), hparams.batch_size)]
    optimizer = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    last = [float("nan")] * len(examples)
    passes = updates = 0
    with trainable(params):
        for _ in range(hparams.num_steps):
            total = 0.0
            for chunk in chunks:
                losses = target_losses(lm, [examples[i] for i in chunk])
                loss = losses.mean()
                total += loss.item() * len(chunk)
                for i, value in zip(chunk, losses.tolist()):
                    last[i] = value
                if loss.item() >= hparams.loss_threshold:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    updates += 1
                if hparams.norm_constraint is not None:
                    with torch.no_grad():
                        for param, name in zip(params, names):
                            param.copy_(torch.clamp(param, originals[name] - hparams.norm_constraint,
                                                    originals[name] + hparams.norm_constraint))
            passes += 1
            if total / len(examples) < hparams.loss_threshold:
                break
    deltas = {name: (param.detach() - originals[name]).cpu() for name, param in zip(names, params)}
    # ft_loss: each request's loss at its last forward (before that pass's step)
    records = [{"case_id": r.case_id, "ft_loss": loss} for r, loss in zip(requests, last)]
    layers = [{**record, "ft_passes": passes, "ft_updates": updates} for record in delta_records(deltas, originals)]
    return EditResult(deltas, originals, records, layers, torch.zeros(len(requests), 0))


EDITOR = Editor("FT-L", FTHyperParams, apply_ft, edits=tuned_params, prepare=None, fixed={"objective": "prompt_last"})
