"""Token positions computed from the actual token ids and character offsets.

Tokenisers differ in BOS handling, padding side and how a leading space attaches to a word, so
nothing here assumes either: targets and subjects are located through offset mappings, and
batches are right-padded by hand (pads at the end never shift the positions of real tokens).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from util.errors import RequestError

FactToken = Literal["subject_last", "subject_first", "last"]


def join_target(prompt: str, target: str) -> str:
    """Prompt followed by the target as a separate word."""
    target = target.strip()
    return prompt + target if prompt.endswith((" ", "\n")) else f"{prompt} {target}"


def _encode(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_with_target(tok, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + target and the index of the first target token.

    A token that straddles the boundary counts as a target token."""
    ids, offsets = _encode(tok, join_target(prompt, target))
    boundary = len(prompt.rstrip(" ")) if not prompt.endswith("\n") else len(prompt)
    start = next((i for i, (s, e) in enumerate(offsets) if e > boundary and e > s), len(ids))
    if start == len(ids):
        raise RequestError(f"target {target!r} produced no tokens after prompt {prompt!r}")
    return ids, start


def target_reads(tok, prompt: str, target: str, teacher_forced: bool = True) -> tuple[list[int], list[int], list[int]]:
    """What a loss on `target` after `prompt` reads: (the ids the model reads, the positions whose
    next-token distribution is scored, the target token scored at each). Teacher-forced: prompt and
    target minus its last token, scored at the prompt's last token and every target token but the
    last; else the prompt alone, every target token scored at its last position."""
    ids, start = encode_with_target(tok, prompt, target)
    targets = ids[start:]
    if teacher_forced:
        return ids[:-1], list(range(start - 1, len(ids) - 1)), targets
    return ids[:start], [start - 1] * len(targets), targets


def subject_position(tok, prompt: str, subject: str, fact_token: FactToken) -> tuple[list[int], int]:
    """Token ids of prompt.format(subject) and the index of the fact token."""
    text = prompt.format(subject)
    ids, offsets = _encode(tok, text)
    if fact_token == "last":
        return ids, len(ids) - 1
    begin = prompt.index("{}")
    end = begin + len(subject)
    inside = [i for i, (s, e) in enumerate(offsets) if e > begin and s < end and e > s]
    if not inside:
        raise RequestError(f"subject {subject!r} has no tokens in {text!r}")
    return ids, inside[-1] if fact_token == "subject_last" else inside[0]


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded at the end."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
