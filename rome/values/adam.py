"""The optimiser of value optimisation: one Adam per request's delta, all rows of one matrix."""
from __future__ import annotations

import torch


class RowAdam:
    """torch.optim.Adam (its defaults) over the rows of one matrix, each row a request's delta
    with its own moments. A row not `live` keeps its value and moments, as Adam leaves a
    parameter without gradient; live rows have all been updated at every step so far (a stopped
    request never resumes), so one step count serves them. Elementwise the same operations as
    torch's Adam (single-tensor and foreach), one kernel each for the whole batch."""

    def __init__(self, values: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(values), torch.zeros_like(values)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, current: torch.Tensor, grad: torch.Tensor, live: torch.Tensor, count: int) -> torch.Tensor:
        """The values of `rows` (now `current`) after update number `count`, returned, not written
        anywhere; the moments of live rows are written back."""
        beta1, beta2 = self.betas
        exp_avg = self.exp_avg[rows].lerp_(grad, 1 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        keep = live[:, None]
        self.exp_avg[rows] = torch.where(keep, exp_avg, self.exp_avg[rows])
        self.exp_avg_sq[rows] = torch.where(keep, exp_avg_sq, self.exp_avg_sq[rows])
        bias_correction1, bias_correction2 = 1 - beta1 ** float(count), 1 - beta2 ** float(count)
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
        return torch.addcdiv(current, exp_avg, denom, value=-(self.lr / bias_correction1))


def clamp_scales(deltas: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Per row, the factor that brings ||delta|| down to its limit: exactly 1 within it, so that
    such rows stay bitwise unchanged."""
    norms = deltas.norm(dim=-1)
    limits = limits.to(norms.device)
    return torch.where(norms > limits, limits / norms, torch.ones_like(limits))
