"""Seeded subsets: the one way this project draws a fixed sample from a list."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def seeded_sample(items: Sequence[T], n: int, seed: int) -> list[T]:
    """`n` of `items` drawn with random.Random(seed), in their original order; all of them where
    n >= len(items). The same items, seed and n give the same subset on every machine."""
    if n >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]
