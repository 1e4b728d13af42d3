"""RECT: MEMIT keeping only the largest relative changes of each edited matrix."""
