"""EMMET: batched editing under equality constraints (the solver lives in util/solve.py)."""
