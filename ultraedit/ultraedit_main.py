"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in
Large Language Models"; release XiaojieGu/UltraEdit, editor/ultraedit.py): per edited projection
W (out x in, v = W k), from one forward and backward of the current model per chunk of requests:

    k_i   the projection's input at each position that predicts a target token
    g_i   d loss / d (the projection's output) there, loss = the chunk's mean target-token NLL
    z_i   = (k_i, g_i) normalised by a running mean and standard deviation kept over the whole
            run (one per projection shape, updated with every chunk's z before the update is solved)
    r_i   = -lr ||k_hat_i||^2 g_hat_i                         (k_hat, g_hat: the two parts of z_i)
    Delta = R K^T (I + K K^T)^-1                               (util/solve.py's least squares, C = I)

with K = [k_i] (in x n, raw keys) and R = [r_i] (out x n). Every projection is solved from the same
keys and gradients (the model before this edit) and all are written at once. The running
statistics live in EditContext.state (checkpointed), so a run continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rome.declaration import Editor
from rome.editor import EditContext, EditResult
from util.arch import site_weight, to_stored
from util.deltas import apply_deltas, delta_records, snapshot
from util.hparams import AT_LEAST_ONE, POSITIVE, check_layers_exist, layers_problem, out_of_range
from util.models import LoadedModel, input_device
from util.nethook import Trace, TraceDict, replace_output
from util.requests import EditRequest
from util.solve import Covariance, solve_least_squares
from util.tokens import right_pad, target_reads

STATE = "ultraedit"  # EditContext.state[STATE][f"{in}x{out}"] = {"n", "mean", "var"}: the running statistics
PROJECTIONS = ("mlp_down", "mlp_up", "mlp_gate")  # the util/arch.py sites UltraEdit may edit


@dataclass(frozen=True)
class UltraEditHyperParams:
    # the projections edited: {site: layers} (util/arch.py sites mlp_down, mlp_up, mlp_gate), in the
    # order the running statistics are updated
    modules: dict[str, list[int]]
    lr: float = 1e-6  # the pseudo-values' step size (the release's editor.lr)
    batch_size: int = 10  # requests per forward and backward, whose mean loss is differentiated (the release's dataset.batch_size)

    def validate(self) -> str | None:
        if not self.modules:
            return "key 'modules' must name at least one site and its layers"
        for site, layers in self.modules.items():
            if site not in PROJECTIONS:
                return f"key 'modules': site '{site}' is not one of {', '.join(PROJECTIONS)}"
            problem = layers_problem(layers, f"modules.{site}")
            if problem:
                return problem
        return out_of_range(self, {"lr": POSITIVE, "batch_size": AT_LEAST_ONE})

    def check_model(self, n_layers: int, source: str = "hparams") -> None:
        for site, layers in self.modules.items():
            check_layers_exist(layers, n_layers, source, f"modules.{site}")


def edited_modules(hparams: UltraEditHyperParams) -> list[tuple[str, int]]:
    """(site, layer) of every edited projection, in hparams order."""
    return [(site, layer) for site, layers in hparams.modules.items() for layer in layers]


def edited_weights(lm: LoadedModel, hparams: UltraEditHyperParams) -> list[str]:
    """The weight of every edited projection (util/arch.py), in hparams order."""
    return [lm.arch.module(site, layer) + ".weight" for site, layer in edited_modules(hparams)]


class RunningMeanStd:
    """The release's nets.RunningMeanStd on a state dict of float64 tensors (n, mean, var): a batch
    x (b x size) adds b * its unbiased variance and the between-batch term to `var`; the standard
    deviation is sqrt(var / (n - 1 + eps))."""

    def __init__(self, state: dict[str, torch.Tensor], size: int, device: torch.device):
        self.state = state
        if not state:
            state.update(n=torch.zeros(1, dtype=torch.float64), mean=torch.zeros(size, dtype=torch.float64),
                         var=torch.zeros(size, dtype=torch.float64))
        self.n, self.mean, self.var = (state[k].to(device, torch.float64) for k in ("n", "mean", "var"))
        self.eps = torch.finfo(torch.float64).eps

    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.mean.device)
        b = x.shape[0]
        n = self.n + b
        delta = x.mean(0) - self.mean
        self.mean = self.mean + b * delta / n
        # one row has no unbiased variance (the release's NaN); its spread is 0
        spread = b * x.var(0) if b > 1 else torch.zeros_like(self.var)
        self.var = self.var + spread + self.n * b * delta.pow(2) / n
        self.n = n
        self.state.update(n=self.n.cpu(), mean=self.mean.cpu(), var=self.var.cpu())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device)
        std = (self.var / (self.n - 1 + self.eps)).sqrt()
        return (x - self.mean) / (std + self.eps)


def answer_reads(tok, request: EditRequest) -> tuple[list[int], list[int], list[int]]:
    """(ids the model reads, the positions that predict the target's tokens, those tokens)."""
    return target_reads(tok, request.text, request.target_new)


def keys_and_gradients(lm: LoadedModel, requests: list[EditRequest], modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: its inputs K (n x in) and the gradients G (n x out) of the requests' mean
    target-token NLL with respect to its outputs, at every target-predicting position (float64)."""
    encoded = [answer_reads(lm.tok, r) for r in requests]
    ids, mask = right_pad([e[0] for e in encoded], lm.tok.pad_token_id)
    device = input_device(lm.model)
    rows = torch.tensor([i for i, e in enumerate(encoded) for _ in e[1]], device=device)
    columns = torch.tensor([p for e in encoded for p in e[1]], device=device)
    labels = torch.tensor([t for e in encoded for t in e[2]], device=device)
    # the embeddings' output becomes a leaf that needs gradients, so that every module output has them
    grad_from = replace_output(lambda hidden: hidden.detach().requires_grad_())
    with torch.enable_grad(), Trace(lm.model, lm.arch.embed, edit_output=grad_from), \
            TraceDict(lm.model, modules, retain_input=True, detach=False) as traces:
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[rows, columns]
        loss = torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
        grads = torch.autograd.grad(loss, [traces[m].output for m in modules])
    return {m: (traces[m].input[rows, columns].detach().double(), g[rows, columns].double()) for m, g in zip(modules, grads)}


def chunks_by_length(lm: LoadedModel, requests: list[EditRequest], size: int) -> list[list[EditRequest]]:
    """The release's collate_fn: requests sorted by the length of what the model reads, longest
    first (ties in their order), in chunks of `size`."""
    ordered = sorted(requests, key=lambda r: len(answer_reads(lm.tok, r)[0]), reverse=True)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def apply_ultraedit(lm: LoadedModel, requests: list[EditRequest], hparams: UltraEditHyperParams, ctx: EditContext) -> EditResult:
    sites = edited_modules(hparams)
    modules = [lm.arch.module(site, layer) for site, layer in sites]
    names = [m + ".weight" for m in modules]
    weights = {m: site_weight(lm.model, lm.arch, site, layer) for m, (site, layer) in zip(modules, sites)}
    originals = snapshot(lm.model, names)
    store = ctx.state.setdefault(STATE, {})
    shared, normalisers = {}, {}
    for m in modules:  # one normaliser per projection shape (in, out), shared as in the release
        out_size, in_size = weights[m].shape
        key = f"{in_size}x{out_size}"
        if key not in shared:
            shared[key] = RunningMeanStd(store.setdefault(key, {}), in_size + out_size, weights[m].device)
        normalisers[m] = shared[key]
    collected: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    for chunk in chunks_by_length(lm, requests, hparams.batch_size):
        traced = keys_and_gradients(lm, chunk, modules)
        for m in modules:  # in hparams order, as the release updates its shared normalisers
            keys, grads = (t.to(weights[m].device) for t in traced[m])
            normalisers[m].update(torch.cat([keys, grads], dim=-1))
            collected[m].append((keys, grads))
    deltas, layers = {}, []
    for m, name in zip(modules, names):
        keys = torch.cat([k for k, _ in collected[m]])
        grads = torch.cat([g for _, g in collected[m]])
        normalised = normalisers[m](torch.cat([keys, grads], dim=-1))
        keys_hat, grads_hat = normalised.split([keys.shape[1], grads.shape[1]], dim=-1)
        residual = -hparams.lr * keys_hat.pow(2).sum(-1, keepdim=True) * grads_hat  # n x out
        delta = solve_least_squares(residual.T.to(keys.device), keys.T, Covariance(keys.shape[1]), layer=m)  # out x in
        deltas[name] = to_stored(lm.arch, delta).to(originals[name].dtype)
        layers.append({"module": m, "keys": keys.shape[0]})
    apply_deltas(lm.model, deltas)
    deltas = {name: delta.cpu() for name, delta in deltas.items()}
    layers = [{**where, **record} for where, record in zip(layers, delta_records(deltas, originals))]
    records = [{"case_id": r.case_id} for r in requests]
    return EditResult(deltas, originals, records, layers, torch.zeros(len(requests), 0))


EDITOR = Editor("UltraEdit", UltraEditHyperParams, apply_ultraedit, edits=edited_weights, prepare=None)
