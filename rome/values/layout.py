"""The batch layout of value optimisation: which rows a batch holds, which of them are still
optimised (the active set), how rows are grouped by length and aligned at their fact token.

Rows, per request: its templated rewrite prompts (prompt + target minus its last token), then
its KL prompts ("{subject} is a"); all right-padded into one (B, T) tensor. The loss reads
log-probabilities at (row, position) pairs: each target token's predicting position and each
KL row's read position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rome.compute_u import templated_prompts
from util.errors import RequestError
from util.models import LoadedModel
from util.requests import EditRequest
from util.tokens import encode_with_target, right_pad, subject_position


@dataclass
class Batch:
    """Rewrite sequences (templated prompt + target minus its last token) and KL sequences."""
    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor
    request_of_row: torch.Tensor  # (B,)
    fact_position: torch.Tensor  # (B,) where the delta is added
    is_rewrite: torch.Tensor  # (B,) bool; the others are KL rows
    bare_row: torch.Tensor  # (n,) the row of each request's bare rewrite prompt
    last_position: torch.Tensor  # (B,) last real token
    kl_read: torch.Tensor  # (B,) where a KL row's next-token distribution is read
    target_row: torch.Tensor  # (n_tokens,) per target token: its row,
    target_position: torch.Tensor  # the position predicting it,
    target_token: torch.Tensor  # its id,
    target_share: torch.Tensor  # and 1 / (target tokens of its prompt)
    n_prompts: int  # templated rewrite prompts per request


def build_batch(lm: LoadedModel, requests: list[EditRequest], templates: list[str], fact_token, kl_prompts: list[str],
                kl_position: str = "fact_token") -> Batch:
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
    last = mask.sum(1) - 1
    return Batch(
        ids, mask, long(request_of_row), long(fact), torch.tensor(rewrite), long(bare), last,
        long(fact) if kl_position == "fact_token" else last,
        long(t_row), long(t_pos), long(t_tok), torch.tensor(t_share), len(templates),
    )


class Active:
    """Index tensors for the requests still being optimised (rows renumbered locally)."""

    def __init__(self, batch: Batch, active: list[int], n_requests: int):
        request_local = torch.full((n_requests,), -1, dtype=torch.long)
        request_local[active] = torch.arange(len(active))
        self.requests = torch.tensor(active, dtype=torch.long)
        self.rows = torch.nonzero(request_local[batch.request_of_row] >= 0)[:, 0]  # batch rows, ascending
        row_local = torch.full((len(batch.ids),), -1, dtype=torch.long)
        row_local[self.rows] = torch.arange(len(self.rows))
        self.row_request = request_local[batch.request_of_row[self.rows]]
        self.fact = batch.fact_position[self.rows]
        rewrite = batch.is_rewrite[self.rows]
        self.rewrite_rows = torch.nonzero(rewrite)[:, 0]
        self.kl_rows = torch.nonzero(~rewrite)[:, 0]
        self.kl_positions = batch.kl_read[self.rows][self.kl_rows]
        self.kl_original = self.rows[self.kl_rows]  # original row numbers: keys of the KL reference
        keep = row_local[batch.target_row] >= 0
        self.t_row = row_local[batch.target_row[keep]]
        self.t_position = batch.target_position[keep]
        self.t_token = batch.target_token[keep]
        self.t_share = batch.target_share[keep]
        self._on: dict[torch.device, ActiveOn] = {}

    def on(self, device: torch.device) -> "ActiveOn":
        """The index tensors a step's loss uses, on `device`: copied once per view, since a copy
        from host memory waits for the device's queue (once per view, not once per step)."""
        if device not in self._on:
            self._on[device] = ActiveOn(*(t.to(device) for t in (
                self.t_token, self.t_share, self.t_row, self.row_request, self.rewrite_rows,
                self.row_request[self.rewrite_rows], self.row_request[self.kl_rows])))
        return self._on[device]

    def read_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row, position) pairs the loss reads: every target token's, then every KL row's."""
        return torch.cat([self.t_row, self.kl_rows]), torch.cat([self.t_position, self.kl_positions])


@dataclass(frozen=True)
class ActiveOn:
    """An Active view's index tensors on a device (`Active.on`)."""
    t_token: torch.Tensor
    t_share: torch.Tensor
    t_row: torch.Tensor
    row_request: torch.Tensor
    rewrite_rows: torch.Tensor
    rewrite_owner: torch.Tensor  # the request of each rewrite row
    kl_owner: torch.Tensor  # the request of each KL row


# A row group costs about as much fixed per-call work (a forward and backward call per layer) as
# this many padded suffix tokens; it sets how finely rows are grouped by suffix length.
GROUP_OVERHEAD_TOKENS = 24


def length_groups(lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest member, plus `overhead` per group
    (default GROUP_OVERHEAD_TOKENS), costs the least (exact: dynamic programme over the sorted
    distinct lengths)."""
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    distinct = sorted(set(lengths))
    count = [sum(n == d for n in lengths) for d in distinct]
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for end in range(1, len(distinct) + 1):
        rows = 0
        for start in range(end, 0, -1):  # group = distinct[start-1 : end], padded to distinct[end-1]
            rows += count[start - 1]
            cost = best[start - 1] + rows * distinct[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start - 1
    bounds, end = [], len(distinct)
    while end:
        bounds.append((distinct[cut[end]], distinct[end - 1]))
        end = cut[end]
    return [[i for i, n in enumerate(lengths) if low <= n <= high] for low, high in reversed(bounds)]


def suffix_groups(batch: Batch, rows: torch.Tensor) -> list[torch.Tensor]:
    """`rows` (indices into it) grouped by suffix length: the fact token and what follows it."""
    suffix = batch.mask[rows].sum(1) - batch.fact_position[rows]
    return [torch.tensor(group) for group in length_groups(suffix.tolist())]


@dataclass
class Aligned:
    """Rows re-laid out so that every fact token sits in column `prefix` (left padding, explicit
    position ids): the columns before it never see the delta (causal attention)."""
    ids: torch.Tensor  # (R, W)
    mask: torch.Tensor
    positions: torch.Tensor
    prefix: int
    shift: torch.Tensor  # (R,) per row: columns added on the left (on the CPU)

    def narrowed(self, local: torch.Tensor) -> "Aligned":
        on = lambda t: t[local.to(t.device)]  # noqa: E731
        return Aligned(on(self.ids), on(self.mask), on(self.positions), self.prefix, on(self.shift))

    def column(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Suffix column of original (right-padded) `positions` in local `rows`."""
        return positions + self.shift[rows] - self.prefix


def align(batch: Batch, rows: torch.Tensor, device: torch.device) -> Aligned:
    ids, mask, fact = batch.ids[rows], batch.mask[rows], batch.fact_position[rows]
    lengths = mask.sum(1)
    prefix = int(fact.max())
    shift = prefix - fact
    width = prefix + int((lengths - fact).max())
    aligned = torch.zeros((len(rows), width), dtype=torch.long)  # pads are masked out
    aligned_mask = torch.zeros_like(aligned)
    positions = torch.zeros_like(aligned)
    for r in range(len(rows)):
        start, n = int(shift[r]), int(lengths[r])
        aligned[r, start:start + n] = ids[r, :n]
        aligned_mask[r, start:start + n] = 1
        positions[r, start:start + n] = torch.arange(n)
    return Aligned(aligned.to(device), aligned_mask.to(device), positions.to(device), prefix, shift)
