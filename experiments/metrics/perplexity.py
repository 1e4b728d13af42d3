"""Perplexity on a fixed held-out slice of a text (default use: the first N tokens of WikiText-2).

The slice is cut into packed windows of `window` tokens (no overlap, no padding except in the
last window); within each window every token after the first is predicted. The result is
token-weighted: exp(total NLL / predicted tokens). Every position is needed here, so the
unembedding runs over all of them, but in chunks to bound the (positions x vocab) memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from util.models import LoadedModel, input_device
from util.progress import progress
from util.tokens import right_pad


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean per predicted token
    n_predicted: int
    n_tokens: int  # tokens in the slice
    window: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def text_slice(tok, path: str | Path, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of the file (no special tokens). Only a generous character prefix
    is tokenised; the cut lies far beyond the tokens kept, so they equal the whole-file tokens."""
    text = Path(path).read_text(encoding="utf-8")
    chars = 16 * n_tokens
    while True:
        ids = tok(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens + 64 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"{path} holds {len(ids)} tokens; {n_tokens} were asked for")
    return ids[:n_tokens]


def perplexity(
    lm: LoadedModel, path: str | Path, n_tokens: int = 8192, window: int = 512, batch_size: int = 8
) -> PerplexityResult:
    """Perplexity of the first n_tokens tokens of the text file at `path`."""
    ids = text_slice(lm.tok, path, n_tokens)
    nll_sum, predicted = nll_of_ids(lm, ids, window, batch_size)
    nll = nll_sum / predicted
    return PerplexityResult(math.exp(nll), nll, predicted, len(ids), window, str(path))


@torch.inference_mode()
def nll_of_ids(lm: LoadedModel, ids: Sequence[int], window: int, batch_size: int, chunk: int = 2048) -> tuple[float, int]:
    """(summed NLL, number of predicted tokens) over packed windows of the token ids."""
    windows = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]  # a 1-token tail predicts nothing
    head = lm.model.get_submodule(lm.arch.unembed)
    device = input_device(lm.model)
    total, count = 0.0, 0
    for start in progress(range(0, len(windows), batch_size), desc=f"perplexity of {len(ids)} tokens", unit="batch", leave=False):
        batch, mask = right_pad(windows[start : start + batch_size], lm.tok.pad_token_id)
        batch, mask = batch.to(device), mask.to(device)
        hidden = lm.model.base_model(input_ids=batch, attention_mask=mask, use_cache=False).last_hidden_state
        # States at real positions that have a real next token, and those next tokens.
        keep = (mask[:, 1:] == 1)
        states = hidden[:, :-1][keep]
        targets = batch[:, 1:][keep]
        for i in range(0, len(targets), chunk):
            logits = lm.arch.final_logits(lm.model.config, head(states[i : i + chunk])).float()
            total += float(F.cross_entropy(logits, targets[i : i + chunk], reduction="sum"))
        count += int(targets.numel())
    return total, count
