"""MEMIT: batched multi-layer editing by least squares (the solver lives in util/solve.py)."""
