"""Teacher-forced scoring of continuations after prompts: few padded forwards, no full logits.

Each (prompt, continuation) pair needs the forward over its tokens minus the last one, read at the
positions that predict continuation tokens. Three things keep that cheap:
- a pair whose needed input is a prefix of another's (the same prompt with a one-token target,
  or a shorter target) is read from the longer row: causal attention makes its states identical;
- rows are sorted by length and cut into batches that balance padding against the number
  of forwards, under a token budget;
- the unembedding and log-softmax run only on the gathered final states, never on
  (batch x seq x vocab).
When all rows start with the same long token prefix (few-shot demonstrations), it is run once
and its KV cache reused. The prefix is found in token space: tokenising the prefix text alone
can split differently at its end (a trailing "\n\n" is one token alone, two before text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from transformers import DynamicCache

from util.errors import RequestError
from util.models import LoadedModel, input_device
from util.progress import progress
from util.tokens import encode_with_target, right_pad

Row = tuple[int, ...]
# Fixed cost of one forward pass in padded-token equivalents (Python and kernel-launch overhead;
# ~30 tokens for the 135M model on CPU): trades fewer forwards against less padding.
BATCH_OVERHEAD = 32


@dataclass(frozen=True)
class ContinuationScore:
    token_logprobs: tuple[float, ...]  # log P(token | everything before it), teacher-forced
    nll: float  # mean per-token negative log-likelihood
    argmax: bool  # every continuation token is the model's top prediction
    token_argmax: tuple[bool, ...] = ()  # per token: it is the top prediction (teacher-forced)

    @property
    def token_accuracy(self) -> float:
        """Fraction of continuation tokens that are the top prediction (zsRE's per-token accuracy)."""
        return sum(self.token_argmax) / len(self.token_argmax)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))


@dataclass(frozen=True)
class _Pair:
    row: int  # index of the forward row that answers this pair
    positions: tuple[int, ...]  # positions whose states predict the continuation tokens
    targets: tuple[int, ...]


@torch.inference_mode()
def score_continuations(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 64,
    max_tokens: int = 8192,
    min_shared_prefix: int = 32,
) -> list[ContinuationScore]:
    """Score every continuation after its prompt (pairs are zipped).

    min_shared_prefix: when every row shares at least this many leading tokens, they are run once
    and their KV cache reused (0 disables)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        return []
    rows, pairs = _plan(lm.tok, prompts, continuations)
    positions: list[list[int]] = [[] for _ in rows]
    for pair in pairs:
        positions[pair.row].extend(pair.positions)
    positions = [sorted(set(p)) for p in positions]
    prefix = _shared_prefix(rows, positions, min_shared_prefix)
    where: dict[tuple[int, int], int] = {}  # (row, position) -> index into that batch's states
    by_row: dict[int, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_row.setdefault(pair.row, []).append(index)
    results: list[ContinuationScore | None] = [None] * len(pairs)
    head = lm.model.get_submodule(lm.arch.unembed)
    batches = _final_states(lm, rows, positions, batch_size, max_tokens, prefix)
    for batch_rows, states in progress(batches, desc=f"scoring {len(pairs)} continuations", unit="batch", leave=False):
        where.clear()
        offset = 0
        for row in batch_rows:
            for position in positions[row]:
                where[(row, position)] = offset
                offset += 1
        logits = lm.arch.final_logits(lm.model.config, head(states)).float()  # soft-capped as the model does
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logits.argmax(dim=-1)
        for row in batch_rows:
            for index in by_row[row]:
                pair = pairs[index]
                at = torch.tensor([where[(row, p)] for p in pair.positions], device=logits.device)
                targets = torch.tensor(pair.targets, device=logits.device)
                token_lp = logprobs[at, targets]
                hits = (top[at] == targets).tolist()
                results[index] = ContinuationScore(
                    token_logprobs=tuple(token_lp.tolist()), nll=float(-token_lp.mean()), argmax=all(hits), token_argmax=tuple(hits)
                )
    return results  # type: ignore[return-value]


def score_label_words(
    lm: LoadedModel,
    prompts: Sequence[str],
    label_words: Sequence[str],
    reduction: Literal["sum", "mean"] = "sum",
    batch_size: int = 64,
    max_tokens: int = 8192,
    min_shared_prefix: int = 32,
) -> torch.Tensor:
    """(n_prompts, n_labels) log-likelihood of each label word after each prompt: the summed
    token log-probs ("sum", the likelihood) or their mean ("mean", length-normalised).
    One-token label words cost one forward row per prompt (all read at the same position)."""
    flat_prompts = [p for p in prompts for _ in label_words]
    flat_labels = [w for _ in prompts for w in label_words]
    scores = score_continuations(lm, flat_prompts, flat_labels, batch_size, max_tokens, min_shared_prefix)
    values = [s.logprob if reduction == "sum" else -s.nll for s in scores]
    return torch.tensor(values, dtype=torch.float64).reshape(len(prompts), len(label_words))


def _plan(tok, prompts: Sequence[str], continuations: Sequence[str]) -> tuple[list[Row], list[_Pair]]:
    """Forward rows (deduplicated; rows that are prefixes of others merged into them) and, per
    pair, the row, positions and target ids to read."""
    needed: list[tuple[Row, tuple[int, ...], tuple[int, ...]]] = []
    for prompt, continuation in zip(prompts, continuations):
        ids, start = encode_with_target(tok, prompt, continuation)
        if start == 0:  # no BOS and an empty prompt: nothing predicts the first token
            raise RequestError(f"continuation {continuation!r} has no context to be scored after prompt {prompt!r}")
        needed.append((tuple(ids[:-1]), tuple(range(start - 1, len(ids) - 1)), tuple(ids[start:])))
    # In lexicographic order a sequence that is a prefix of another is a prefix of its successor,
    # so one backward sweep sends every row to the longest row that contains it.
    unique = sorted({row for row, _, _ in needed})
    owner = list(range(len(unique)))
    for i in range(len(unique) - 2, -1, -1):
        follower = unique[i + 1]
        if follower[: len(unique[i])] == unique[i]:
            owner[i] = owner[i + 1]
    kept = sorted(set(owner))
    row_of_kept = {u: k for k, u in enumerate(kept)}
    row_index = {row: row_of_kept[owner[i]] for i, row in enumerate(unique)}
    rows = [unique[u] for u in kept]
    pairs = [_Pair(row_index[row], positions, targets) for row, positions, targets in needed]
    return rows, pairs


def _shared_prefix(rows: list[Row], positions: list[list[int]], minimum: int) -> Row:
    """The leading tokens common to all rows, cut before the first position any row reads (the
    prefix's own states are not kept)."""
    if minimum <= 0 or len(rows) < 2:
        return ()
    length = min(min(len(r) for r in rows) - 1, min(p[0] for p in positions))
    first = rows[0]
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
        if length < minimum:
            return ()
    return first[:length]


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int, overhead: int = BATCH_OVERHEAD) -> list[list[int]]:
    """Indices grouped into batches of similar length: rows sorted longest first are cut into
    contiguous groups minimising padded tokens + `overhead` per forward (dynamic programming).
    A batch holds at most batch_size rows and max_tokens padded tokens (a longer row runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(j - batch_size, 0) - 1, -1):
            padded = (j - i) * sizes[i]  # the group's longest row is its first
            if padded > max_tokens and j - i > 1:
                break
            cost = best[i] + padded + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@torch.inference_mode()
def _final_states(
    lm: LoadedModel,
    rows: list[Row],
    positions: list[list[int]],
    batch_size: int,
    max_tokens: int,
    prefix: Row,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Per batch: the row indices and the final (normed) hidden states at each row's positions,
    concatenated in row order."""
    cached = _prefix_cache(lm, prefix) if prefix else None
    cut = len(prefix)
    lengths = [len(row) for row in rows]  # the whole row counts: attention spans the prefix
    for batch_rows in _batches(lengths, batch_size, max_tokens):
        hidden = _forward(lm, [rows[r][cut:] for r in batch_rows], cached, cut)
        row_at = torch.tensor([i for i, r in enumerate(batch_rows) for _ in positions[r]], device=hidden.device)
        pos_at = torch.tensor([p - cut for r in batch_rows for p in positions[r]], device=hidden.device)
        yield batch_rows, hidden[row_at, pos_at]


def _forward(lm: LoadedModel, sequences: list[Row], cached: DynamicCache | None, offset: int) -> torch.Tensor:
    """Last hidden states (after the final norm) of right-padded sequences, optionally continuing
    a cached prefix of `offset` tokens."""
    device = input_device(lm.model)
    ids, mask = right_pad(sequences, lm.tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    if cached is None:
        return lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    batch = len(sequences)
    # Expanded views of the prefix's keys/values: the cache copies them once when it appends.
    cache = DynamicCache(
        [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)) for layer in cached.layers],
        config=lm.model.config,
    )
    full_mask = torch.cat([torch.ones(batch, offset, dtype=mask.dtype, device=device), mask], dim=1)
    position_ids = torch.arange(offset, offset + ids.shape[1], device=device).expand(batch, -1)
    out = lm.model.base_model(
        input_ids=ids, attention_mask=full_mask, position_ids=position_ids, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state


def _prefix_cache(lm: LoadedModel, prefix: Row) -> DynamicCache:
    ids = torch.tensor([prefix], device=input_device(lm.model))
    return lm.model.base_model(input_ids=ids, use_cache=True).past_key_values
