"""``omega += alpha * sum_s |a_s^T b_s|``: the per-sample abs-GEMM the rules need.

A stand-in in PyTorch (chunked bmm, scratch bounded by ``budget`` bytes) until
the fused op lands; same contract as ``mk.abs_bmm_accumulate_``.
"""

from __future__ import annotations

import torch

from ...ops import abs_outer_accumulate_

DEFAULT_BUDGET = 64 << 20


def abs_bmm(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
            budget: int | None = None) -> None:
    """``omega (J, I) += alpha * sum_s |a_s^T b_s|`` with ``a`` (S, T, J), ``b`` (S, T, I)."""
    S, T, J = a.shape
    I = b.shape[2]
    if S == 0 or J == 0 or I == 0:
        return
    if T == 1:
        abs_outer_accumulate_(omega, a[:, 0], b[:, 0], alpha)
        return
    per_sample = 4 * J * I
    chunk = max(1, (budget or DEFAULT_BUDGET) // max(per_sample, 1))
    for lo in range(0, S, chunk):
        g = torch.bmm(a[lo:lo + chunk].transpose(1, 2).float(), b[lo:lo + chunk].float())
        omega.add_(g.abs_().sum(0), alpha=alpha)
