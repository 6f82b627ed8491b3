r"""How per-sample gradients become importance numerators: ``sum_k r(g_k)``, with ``r`` taken elementwise.

The layer rules (``rules/``) know what one sample's gradient of a parameter
is, in the cheapest form their layer allows: factored (``g_k = a_k^T b_k``, a
sum over the sample's positions), dense (``(S, *shape)`` per-sample
gradients of a chunk of samples) or sparse (a few rows per sample: an
embedding's tokens). A :class:`Reduction` turns each form into the numerator
``sum_k r(g_k)``; MAS's is :class:`AbsReduction` (``r = |.|``, the paper's
Eq. 2), with the fused ``abs_bmm`` kernel for the factored form. Another
reduction (EWC's Fisher diagonal, ``r = (.)^2``) is a subclass of a few lines
and changes no layer rule.
"""

from __future__ import annotations

import torch

from ..ops import abs_accumulate_, abs_bmm_accumulate_  # noqa: F401  (abs_bmm_accumulate_: defines the op)

_ABS_BMM = torch.ops.mas_kernels.abs_bmm_accumulate_.default
_ABS_ACCUMULATE = torch.ops.mas_kernels.abs_accumulate_.default


class Reduction:
    """``r``, elementwise, and the sums over samples of each gradient form (subclasses: :meth:`apply`, and
    :meth:`bmm_` when a fused kernel does the factored form faster than the default)."""

    name = "reduction"

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """``r(g)`` elementwise (may work in place on ``g``, which callers own)."""
        raise NotImplementedError

    def dense_(self, acc: torch.Tensor, g: torch.Tensor) -> None:
        """``acc += sum_s r(g_s)`` for per-sample gradients ``g`` of shape ``(S, *acc.shape)``."""
        acc.add_(self.apply(g.to(acc.dtype)).sum(0))

    def accumulate_(self, accs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """``accs[i] += r(grads[i])`` for one sample's gradients (``grads``: owned by the caller, may be
        overwritten)."""
        torch._foreach_add_(accs, [self.apply(g.to(a.dtype)) for a, g in zip(accs, grads)])

    def bmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, budget: int) -> None:
        """``acc += sum_s r(a_s^T b_s)`` with ``a`` (S, T, J), ``b`` (S, T, I): per-sample products in chunks of
        samples within ``budget`` bytes."""
        S, _, J = a.shape
        step = max(1, min(S, budget // max(1, acc.element_size() * J * b.shape[2])))
        for lo in range(0, S, step):
            g = torch.bmm(a[lo:lo + step].transpose(1, 2).to(acc.dtype), b[lo:lo + step].to(acc.dtype))
            self.dense_(acc, g)


class AbsReduction(Reduction):
    """MAS: ``sum_k |g_k|``."""

    name = "abs"

    def apply(self, g):
        return g.abs_() if not g.requires_grad else g.abs()

    def accumulate_(self, accs, grads):
        _ABS_ACCUMULATE(accs, grads, 1.0)  # one fused pass over every pair (the op: see bmm_)

    def bmm_(self, acc, a, b, budget):
        if acc.dtype == torch.float32:
            # The op itself, not its front door: whichever kernel serves the call runs the op's guard (in C++
            # for the native one), and the front door's Python checks would repeat it per layer and batch.
            _ABS_BMM(acc, a, b, 1.0, budget)
        else:  # a float64 model's numerators: the products in float64
            super().bmm_(acc, a, b, budget)


ABS = AbsReduction()
