"""The one update solver. Every editor hands it the residual R (d x n: what the layer's output
must gain at each edited key), the keys K (m x n) and a preservation matrix, and picks a constraint:

  least squares (MEMIT, ENCORE):  Delta = R K^T (C + K K^T)^-1
      minimises tr(Delta C Delta^T) + ||Delta K - R||^2
  equality (ROME, r-ROME, EMMET): Delta = R (K_dir^T C^-1 K + mu I)^-1 K_dir^T C^-1
      minimises tr(Delta C Delta^T) subject to Delta K = R (mu = 0); K_dir = K except in the
      original ROME, whose direction uses k* while K holds the bare prompt's key

C is `Covariance`: lambda C0 (+ extra terms), or the identity. Everything is float64 and solved
with Cholesky factorisations or LU solves, never an explicit inverse. A system that is singular
or too ill-conditioned to trust raises SolverError naming the layer and the condition number.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from util.errors import SolverError

MAX_CONDITION = 1e12  # float64 solves lose ~log10(cond) of their 16 digits


def condition_number(matrix: torch.Tensor) -> float:
    """2-norm condition number (exact for symmetric matrices via eigenvalues, else via SVD)."""
    if torch.equal(matrix, matrix.T):
        eig = torch.linalg.eigvalsh(matrix).abs()
    else:
        eig = torch.linalg.svdvals(matrix)
    smallest = eig.min().item()
    return float("inf") if smallest == 0 else eig.max().item() / smallest


def _ill_conditioned(matrix: torch.Tensor, layer: str, what: str) -> SolverError:
    cond = condition_number(matrix)
    return SolverError(
        f"layer {layer}: the {what} is singular or ill-conditioned (condition number {cond:.3g}); "
        f"raise mom2_update_weight / emmet_lambda, or look for duplicate or contradictory requests"
    )


def cholesky(matrix: torch.Tensor, layer: str, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive-definite matrix, checked for conditioning.

    (max/min of the factor's diagonal)^2 is a cheap lower bound of the condition number; the exact
    number is computed only for the error message."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    diag = factor.diagonal().abs() if info.item() == 0 else None
    if diag is None or diag.min().item() == 0 or (diag.max() / diag.min()).item() ** 2 > MAX_CONDITION:
        raise _ill_conditioned(matrix, layer, what)
    return factor


class Covariance:
    """C = weight * C0 + extra (or the identity), with its Cholesky factor computed once."""

    def __init__(self, dim: int, mom2: torch.Tensor | None = None, weight: float = 1.0, extra: torch.Tensor | None = None, layer: str = "?"):
        self.dim, self.layer = dim, layer
        if mom2 is None and extra is None:
            self.matrix = None  # identity
        else:
            matrix = torch.zeros(dim, dim, dtype=torch.float64) if mom2 is None else weight * mom2.double()
            self.matrix = matrix + extra.double() if extra is not None else matrix
        self._factor: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        return torch.eye(self.dim, dtype=torch.float64) if self.matrix is None else self.matrix

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C^-1 rhs."""
        if self.matrix is None:
            return rhs.double()
        if self._factor is None:
            self._factor = cholesky(self.matrix, self.layer, "preservation covariance C")
        return torch.cholesky_solve(rhs.double(), self._factor)


@dataclass
class SolveInfo:
    layer: str
    constraint: str
    seconds: float
    extras: dict = field(default_factory=dict)


def solve_least_squares(R: torch.Tensor, K: torch.Tensor, cov: Covariance, layer: str = "?") -> torch.Tensor:
    """Delta = R K^T (C + K K^T)^-1 (MEMIT's normal equations)."""
    K, R = K.double(), R.double()
    system = cov.dense() + K @ K.T
    factor = cholesky(system, layer, "MEMIT system C + K K^T")
    # Delta^T = (C + K K^T)^-1 K R^T, the system being symmetric.
    return torch.cholesky_solve(K @ R.T, factor).T


def solve_equality(R: torch.Tensor, K: torch.Tensor, cov: Covariance, mu: float = 0.0, K_dir: torch.Tensor | None = None, layer: str = "?") -> torch.Tensor:
    """Delta = R (K_dir^T C^-1 K + mu I)^-1 K_dir^T C^-1; with mu = 0, Delta K = R exactly."""
    K, R = K.double(), R.double()
    directions = cov.solve(K if K_dir is None else K_dir.double())  # C^-1 K_dir, m x n
    gram = directions.T @ K + mu * torch.eye(K.shape[1], dtype=torch.float64)
    if K_dir is None:
        gram = (gram + gram.T) / 2  # symmetric up to rounding; keep it exactly so for Cholesky
        factor = cholesky(gram, layer, "EMMET system K^T C^-1 K + mu I")
        weights = torch.cholesky_solve(R.T, factor)  # G^-1 R^T, n x d
    else:
        weights, info = torch.linalg.solve_ex(gram.T, R.T)
        if info.item() != 0 or not torch.isfinite(weights).all() or condition_number(gram) > MAX_CONDITION:
            raise _ill_conditioned(gram, layer, "ROME denominator (C^-1 k*)^T k")
    return (directions @ weights).T


def solve_update(R: torch.Tensor, K: torch.Tensor, cov: Covariance, constraint: str, mu: float = 0.0,
                 K_dir: torch.Tensor | None = None, layer: str = "?") -> tuple[torch.Tensor, SolveInfo]:
    """Dispatch on the constraint; returns Delta (d x m, float64) and timing."""
    start = time.perf_counter()
    if constraint == "least_squares":
        delta = solve_least_squares(R, K, cov, layer)
    elif constraint == "equality":
        delta = solve_equality(R, K, cov, mu, K_dir, layer)
    else:
        raise ValueError(f"unknown constraint {constraint!r}")
    if not torch.isfinite(delta).all():
        raise SolverError(f"layer {layer}: the {constraint} update is not finite")
    return delta, SolveInfo(layer, constraint, time.perf_counter() - start)
