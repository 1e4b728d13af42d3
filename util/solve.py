"""The one update solver. Every editor hands it the residual R (d x n: what the layer's output
must gain at each edited key), the keys K (m x n) and a preservation matrix, and picks a constraint:

  least squares (MEMIT, ENCORE):  Delta = R K^T (C + mu I + K_p K_p^T + K K^T)^-1
      minimises tr(Delta (C + mu I + K_p K_p^T) Delta^T) + ||Delta K - R||^2; MEMIT has mu = 0 and
      no K_p; ENCORE adds the Frobenius term mu I and the keys K_p of the run's earlier edits
  equality (ROME, r-ROME, EMMET): Delta = R (K_dir^T C^-1 K + mu I)^-1 K_dir^T C^-1
      minimises tr(Delta C Delta^T) subject to Delta K = R (mu = 0); K_dir = K except in the
      original ROME, whose direction uses k* while K holds the bare prompt's key
  null space (AlphaEdit):         Delta = R K^T P (K_p K_p^T P + K K^T P + alpha I)^-1
      P = U U^T projects onto the eigenvectors U of C0 with eigenvalues below a threshold, so
      Delta = Delta P and the preserved keys (C0's large directions) are left (nearly) unchanged

C is `Covariance`: lambda C0 (+ extra terms), or the identity. Solves run on the device of the
keys handed in (the edited weight's device: a GPU when there is one). Everything is float64 and solved
with Cholesky factorisations or LU solves, never an explicit inverse. A system that is singular
or too ill-conditioned to trust raises SolverError naming the layer and the condition number.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

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
        f"raise mom2_update_weight / emmet_lambda / L2, or look for duplicate or contradictory requests"
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
    """C = weight * C0 + extra (or the identity), with its Cholesky factor computed once.

    The matrix and its factor are kept where the matrix was made, or where `kept(keep)` says
    (rome/editor.py gives util.memory.SolverPlacement.keep, which may say host memory); solves run
    on the device of their right-hand side, where the factor is computed once and moved in per
    solve. A cached factor moves one m x m matrix in, where refactorising would move C in and redo
    an O(m^3) float64 Cholesky (about 50 ms at m = 14336 on a GPU) besides: caching is cheaper."""

    def __init__(self, dim: int, mom2: torch.Tensor | None = None, weight: float = 1.0, extra: torch.Tensor | None = None, layer: str = "?"):
        self.dim, self.layer = dim, layer
        self._keep: Callable[[torch.Tensor], torch.Tensor] | None = None
        if mom2 is None and extra is None:
            self.matrix = None  # identity
        else:
            # on the device of the statistics handed in (the edited weight's): never a default device
            matrix = torch.zeros(dim, dim, dtype=torch.float64, device=extra.device) if mom2 is None else weight * mom2.double()
            self.matrix = matrix + extra.to(matrix.device, torch.float64) if extra is not None else matrix
        self._factor: torch.Tensor | None = None  # kept beside the matrix

    def kept(self, keep: Callable[[torch.Tensor], torch.Tensor]) -> "Covariance":
        """Keep the matrix and its factor where `keep` puts them from now on (moving them if needed)."""
        self._keep = keep
        if self.matrix is not None:
            self.matrix = keep(self.matrix)
        if self._factor is not None:
            self._factor = keep(self._factor)
        return self

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.matrix is None:
            return torch.eye(self.dim, dtype=torch.float64, device=device)
        return self.matrix.to(device)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C^-1 rhs, on rhs's device (the factor is computed there once, then kept beside C)."""
        if self.matrix is None:
            return rhs.double()
        if self._factor is None:
            factor = cholesky(self.matrix.to(rhs.device), self.layer, "preservation covariance C")
            self._factor = factor.to(self.matrix.device) if self._keep is None else self._keep(factor)
        else:
            factor = self._factor.to(rhs.device)
        return torch.cholesky_solve(rhs.double(), factor)


@dataclass
class SolveInfo:
    layer: str
    constraint: str
    seconds: float
    extras: dict = field(default_factory=dict)


def solve_least_squares(R: torch.Tensor, K: torch.Tensor, cov: Covariance, layer: str = "?", mu: float = 0.0,
                        prior: torch.Tensor | None = None) -> torch.Tensor:
    """Delta = R K^T (C + mu I + prior + K K^T)^-1 (MEMIT's normal equations; ENCORE's with
    mu > 0 and prior = K_p K_p^T)."""
    K, R = K.double(), R.double()
    system = cov.dense(K.device)
    if mu:
        system = system + mu * torch.eye(system.shape[0], dtype=torch.float64, device=K.device)
    if prior is not None:
        system = system + prior.to(K.device, torch.float64)
    system = system + K @ K.T
    factor = cholesky(system, layer, "least-squares system C + K K^T")
    # freed before the solve, which copies the factor (torch.cholesky_solve clones both operands):
    # one m x m float64 matrix less at the edit's peak (1.5 GiB at m = 14336, seen on an H200)
    del system
    # Delta^T = system^-1 K R^T, the system being symmetric.
    return torch.cholesky_solve(K @ R.T, factor).T


def solve_equality(R: torch.Tensor, K: torch.Tensor, cov: Covariance, mu: float = 0.0, K_dir: torch.Tensor | None = None, layer: str = "?") -> torch.Tensor:
    """Delta = R (K_dir^T C^-1 K + mu I)^-1 K_dir^T C^-1; with mu = 0, Delta K = R exactly."""
    K, R = K.double(), R.double()
    directions = cov.solve(K if K_dir is None else K_dir.double())  # C^-1 K_dir, m x n
    gram = directions.T @ K + mu * torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
    if K_dir is None:
        gram = (gram + gram.T) / 2  # symmetric up to rounding; keep it exactly so for Cholesky
        factor = cholesky(gram, layer, "EMMET system K^T C^-1 K + mu I")
        weights = torch.cholesky_solve(R.T, factor)  # G^-1 R^T, n x d
    else:
        weights, info = torch.linalg.solve_ex(gram.T, R.T)
        if info.item() != 0 or not torch.isfinite(weights).all() or condition_number(gram) > MAX_CONDITION:
            raise _ill_conditioned(gram, layer, "ROME denominator (C^-1 k*)^T k")
    return (directions @ weights).T


def nullspace_basis(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal eigenvectors U (m x r, float64) of C0 whose eigenvalues are below `threshold`:
    AlphaEdit's projection is P = U U^T (the release thresholds C0 = E[k k^T] itself, unscaled)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(mom2.double())
    return eigenvectors[:, eigenvalues < threshold]


def solve_nullspace(R: torch.Tensor, K: torch.Tensor, basis: torch.Tensor, alpha: float,
                    prior: torch.Tensor | None = None, layer: str = "?") -> torch.Tensor:
    """AlphaEdit: Delta = R K^T P (prior P + K K^T P + alpha I)^-1 with P = U U^T, U = `basis`.

    By the push-through identity P (A P + alpha I)^-1 = U (U^T A U + alpha I)^-1 U^T this is
    Delta = B U^T with B = R (U^T K)^T (alpha I + U^T prior U + (U^T K)(U^T K)^T)^-1: least squares
    in the null-space coordinates, an r x r symmetric positive-definite system (alpha > 0). The
    update is exactly of the form (.) P, so Delta k ~ 0 for every key k with P k ~ 0."""
    if basis.shape[1] == 0:
        raise SolverError(f"layer {layer}: the null space is empty (no eigenvalue of C0 below nullspace_threshold)")
    U = basis.to(K.device, torch.float64)
    rank = U.shape[1]
    reduced_prior = None if prior is None else U.T @ (prior.to(K.device, torch.float64) @ U)
    ridge = Covariance(rank, extra=alpha * torch.eye(rank, dtype=torch.float64, device=K.device))
    return solve_least_squares(R, U.T @ K.double(), ridge, layer, prior=reduced_prior) @ U.T


def all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """Whether every entry is finite, checked `rows` rows at a time: torch.isfinite of a whole d x m
    float64 Delta makes a float64 |Delta| and three boolean masks beside it (0.6 GiB at the Llama-3-8B
    shape, an r-ROME edit's peak on an H200). One read by the host, as before."""
    return bool(torch.stack([torch.isfinite(part).all() for part in matrix.split(rows)]).all())


def solve_update(R: torch.Tensor, K: torch.Tensor, cov: Covariance | None, constraint: str, mu: float = 0.0,
                 K_dir: torch.Tensor | None = None, layer: str = "?", prior: torch.Tensor | None = None,
                 basis: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveInfo]:
    """Dispatch on the constraint; returns Delta (d x m, float64) and timing.

    mu is each system's multiple of the identity: EMMET's conditioning term (equality), ENCORE's
    Frobenius weight (least squares), AlphaEdit's alpha (nullspace). prior = K_p K_p^T of earlier
    edits (least squares, nullspace); basis = U of the null space (nullspace, where C is unused: cov None)."""
    start = time.perf_counter()
    extras = {}
    if constraint == "least_squares":
        delta = solve_least_squares(R, K, cov, layer, mu, prior)
    elif constraint == "equality":
        delta = solve_equality(R, K, cov, mu, K_dir, layer)
    elif constraint == "nullspace":
        delta = solve_nullspace(R, K, basis, mu, prior, layer)
        extras["nullspace_dim"] = basis.shape[1]
    else:
        raise ValueError(f"unknown constraint {constraint!r}")
    if not all_finite(delta):
        raise SolverError(f"layer {layer}: the {constraint} update is not finite")
    return delta, SolveInfo(layer, constraint, time.perf_counter() - start, extras)
