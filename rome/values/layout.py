"""The batch layout of value optimisation: the rows a batch holds, the one table of what the loss
reads in them, the view of the requests still optimised, and rows grouped by length and aligned
at their fact token for the replays.

Rows, per request: its templated rewrite prompts (prompt + target_new minus its last token), its
KL prompts ("{subject} is a") and, when a loss term reads them (`TRUE`), its templated prompts +
target_true minus its last token; all right-padded into one (B, T) tensor, each row with the
position where the delta is added (its fact token).

The reads: one table, a row per (row, position) where a log-probability distribution is read,
of a kind, with the token the loss takes from it (-1: the whole distribution), its weight and
the request that owns it. The table is ordered by kind (`KINDS`), so that each kind's reads are
one slice of what a replay returns. A new loss term is a new kind of read built here and a term
in rome/compute_v.py's loss; the replays read whatever the table lists.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rome.compute_u import templated_prompts
from rome.hparams import EditHyperParams
from util.errors import RequestError
from util.memory import EditShape
from util.models import LoadedModel
from util.requests import EditRequest
from util.tokens import encode_with_target, right_pad, subject_position

# The kinds of read, in table order: target_new's tokens after each templated prompt; the next-token
# distribution of each KL prompt; target_true's tokens after each templated prompt (built only for
# a loss that reads them, rome/compute_v.py's ValueSettings.true_penalty).
TARGET, KL, TRUE = "target", "kl", "true"
KINDS = (TARGET, KL, TRUE)
PAPERS_KINDS = (TARGET, KL)  # what the papers' loss reads


@dataclass
class Reads:
    """The table of reads (one entry per read, ordered by kind)."""
    row: torch.Tensor  # the row read
    position: torch.Tensor  # the position whose next-token distribution is read
    kind: torch.Tensor  # KINDS.index(kind)
    token: torch.Tensor  # the token whose log-probability the loss takes; -1: the whole distribution
    weight: torch.Tensor  # float32: 1 / (tokens of its target) for token reads, 1 for distributions
    owner: torch.Tensor  # the request

    def __len__(self) -> int:
        return len(self.row)

    def select(self, index: torch.Tensor) -> "Reads":
        return Reads(*(t[index] for t in self.columns()))

    def columns(self) -> tuple[torch.Tensor, ...]:
        return self.row, self.position, self.kind, self.token, self.weight, self.owner

    def span(self, kind: str) -> slice:
        """The slice of the table (and of a replay's output) holding the reads of `kind`."""
        code = KINDS.index(kind)
        return slice(int((self.kind < code).sum()), int((self.kind <= code).sum()))


@dataclass
class Batch:
    """The rows of one value optimisation and the table of what its loss reads."""
    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor
    row_owner: torch.Tensor  # (B,) the request of each row
    fact_position: torch.Tensor  # (B,) where the delta is added
    bare_row: torch.Tensor  # (n,) the row of each request's bare rewrite prompt
    reads: Reads
    n_prompts: int  # templated prompts per request

    @property
    def n_requests(self) -> int:
        return len(self.bare_row)

    def chunk(self, start: int, stop: int) -> "Batch":
        """The batch of requests start..stop-1, equal to the one build_batch makes of them (a
        request's rows are consecutive; padding is cut to the chunk's longest row)."""
        first, end = int(self.bare_row[start]), int(self.bare_row[stop]) if stop < self.n_requests else len(self.ids)
        width = int(self.mask[first:end].sum(1).max())
        keep = (self.reads.owner >= start) & (self.reads.owner < stop)
        reads = self.reads.select(keep)
        reads.row, reads.owner = reads.row - first, reads.owner - start
        return Batch(self.ids[first:end, :width], self.mask[first:end, :width], self.row_owner[first:end] - start,
                     self.fact_position[first:end], self.bare_row[start:stop] - first, reads, self.n_prompts)

    def shape(self, loss_layer: int, edited_layer: int) -> EditShape:
        """What one request puts through the model (util/memory.py's estimate), read off the rows:
        the most rows and reads of any request, the longest row and suffix."""
        lengths = self.mask.sum(1)
        per_request = lambda owners: int(torch.bincount(owners, minlength=self.n_requests).max())  # noqa: E731
        kl = self.reads.kind == KINDS.index(KL)
        return EditShape(self.n_prompts, per_request(self.row_owner), per_request(self.reads.owner), per_request(self.reads.owner[kl]),
                         int(lengths.max()), int((lengths - self.fact_position).max()), loss_layer, edited_layer, self.n_requests)


class _Builder:
    """Rows and reads appended request by request; the reads of each kind kept apart until the end."""

    def __init__(self, lm: LoadedModel, fact_token):
        self.lm, self.fact_token = lm, fact_token
        self.seqs, self.owner, self.fact = [], [], []
        self.reads: dict[str, list[tuple]] = {kind: [] for kind in KINDS}

    def add_row(self, ids: list[int], fact: int, owner: int) -> int:
        self.seqs.append(ids)
        self.fact.append(fact)
        self.owner.append(owner)
        return len(self.seqs) - 1

    def add_target(self, kind: str, request: EditRequest, prompt: str, target: str, owner: int) -> int:
        """A templated prompt followed by `target` minus its last token, and a read per target token."""
        text = prompt.format(request.subject)
        full, start = encode_with_target(self.lm.tok, text, target)
        prefix, position = subject_position(self.lm.tok, prompt, request.subject, self.fact_token)
        if self.fact_token == "last":
            position = start - 1
        elif full[: position + 1] != prefix[: position + 1]:
            raise RequestError(f"{request.label()}: tokenisation of {text!r} changes when the target is appended")
        row = self.add_row(full[:-1], position, owner)
        self.reads[kind] += [(row, j - 1, full[j], 1.0 / (len(full) - start), owner) for j in range(start, len(full))]
        return row

    def add_kl(self, request: EditRequest, kl_prompt: str, kl_position: str, owner: int) -> None:
        ids, position = subject_position(self.lm.tok, kl_prompt, request.subject, self.fact_token)
        row = self.add_row(ids, position, owner)
        self.reads[KL].append((row, position if kl_position == "fact_token" else len(ids) - 1, -1, 1.0, owner))

    def table(self) -> Reads:
        entries = [(*entry, code) for code, kind in enumerate(KINDS) for entry in self.reads[kind]]
        row, position, token, weight, owner, kind = zip(*entries)
        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return Reads(long(row), long(position), long(kind), long(token), torch.tensor(weight), long(owner))


def build_batch(lm: LoadedModel, requests: list[EditRequest], templates: list[str], hparams: EditHyperParams,
                kinds: tuple[str, ...] = PAPERS_KINDS) -> Batch:
    """The rows and reads of `requests` for the loss terms reading `kinds` (TARGET and KL always)."""
    built, bare = _Builder(lm, hparams.fact_token), []
    for i, request in enumerate(requests):
        prompts = templated_prompts(request, templates)
        bare.append(built.add_target(TARGET, request, prompts[0], request.target_new, i))
        for prompt in prompts[1:]:
            built.add_target(TARGET, request, prompt, request.target_new, i)
        for kl_prompt in hparams.kl_prompts:
            built.add_kl(request, kl_prompt, hparams.kl_position, i)
        if TRUE in kinds and request.target_true is not None:
            for prompt in prompts:
                built.add_target(TRUE, request, prompt, request.target_true, i)
    ids, mask = right_pad(built.seqs, lm.tok.pad_token_id)
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Batch(ids, mask, long(built.owner), long(built.fact), long(bare), built.table(), len(templates))


class View:
    """The requests still optimised (`requests`, ascending) and what of the batch they use: their
    rows (batch rows, ascending) and reads, rows and requests renumbered locally. `on(device)` is
    the same view with its tensors on a device, copied once per view: a copy from host memory
    waits for the device's queue."""

    def __init__(self, batch: Batch, requests: list[int]):
        local = torch.full((batch.n_requests,), -1, dtype=torch.long)
        local[requests] = torch.arange(len(requests))
        self.requests = torch.tensor(requests, dtype=torch.long)
        self.rows = torch.nonzero(local[batch.row_owner] >= 0)[:, 0]
        row_local = torch.full((len(batch.ids),), -1, dtype=torch.long)
        row_local[self.rows] = torch.arange(len(self.rows))
        self.row_request = local[batch.row_owner[self.rows]]
        self.fact = batch.fact_position[self.rows]
        self.read_ids = torch.nonzero(local[batch.reads.owner] >= 0)[:, 0]  # the reads' numbers in the batch's table
        self.reads = batch.reads.select(self.read_ids)
        self.reads.row, self.reads.owner = row_local[self.reads.row], local[self.reads.owner]
        self.spans = {kind: self.reads.span(kind) for kind in KINDS}
        self.kl_reference = self.read_ids[self.spans[KL]] - batch.reads.span(KL).start  # the KL reads among the batch's
        self.read_rows = {kind: self._rows_reading(kind) for kind in KINDS}
        self._on: dict[torch.device, View] = {}

    def _rows_reading(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(local rows with reads of `kind`, ascending; the local request of each)."""
        rows = torch.unique(self.reads.row[self.spans[kind]])
        return rows, self.row_request[rows]

    def __len__(self) -> int:
        return len(self.requests)

    def on(self, device: torch.device) -> "View":
        if device not in self._on:
            moved = copy.copy(self)
            moved.row_request, moved.kl_reference = self.row_request.to(device), self.kl_reference.to(device)
            moved.reads = Reads(*(t.to(device) for t in self.reads.columns()))
            moved.read_rows = {kind: (rows.to(device), owners.to(device)) for kind, (rows, owners) in self.read_rows.items()}
            moved._on = {device: moved}
            self._on[device] = moved
        return self._on[device]


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
