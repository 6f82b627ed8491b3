r"""The penalty term ``lam * sum Omega (theta - theta*)^2`` over fixed, validated lists.

Built once per set of parameters (the lists are checked then, never per
step), it serves both ways of applying the penalty:

* :meth:`Regularizer.penalty`: the value, differentiable w.r.t. the
  parameters (``loss = task_loss + reg.penalty()``); one fused op whose
  forward already computes the gradient;
* :meth:`Regularizer.add_grad_`: after ``backward()``, ``2 lam Omega (theta -
  theta*)`` added into each ``.grad`` in one pass over memory; returns the value.

``MAS`` holds one over its flat Omega/anchor views; ``ShardedPenalty`` one over
this rank's local shards (``local`` maps a parameter to the tensor the op
sees, e.g. a DTensor's local shard).
"""

from __future__ import annotations

from typing import Callable

import torch

from .ops.penalty import _check as _check_penalty_args


class Regularizer:
    """The MAS penalty over ``params`` with fixed ``anchors`` and ``omegas`` (same order).

    Args:
        who: names the caller in error messages.
        params: the parameters (leaf tensors that receive ``.grad``).
        anchors: theta*, one per parameter.
        omegas: Omega (fp32), one per parameter.
        lam: lambda.
        local: maps a parameter (or its ``.grad``) to the tensor the op works
            on; ``None`` for the identity.
    """

    def __init__(self, who: str, params: list[torch.Tensor], anchors: list[torch.Tensor],
                 omegas: list[torch.Tensor], lam: float, local: Callable | None = None):
        self.params = list(params)
        self.anchors = list(anchors)
        self.omegas = list(omegas)
        self.lam = float(lam)
        self.local = local
        self._detached = [p.detach() for p in self.params] if local is None else None
        if self.params:
            view = local or (lambda t: t)
            _check_penalty_args(who, [view(p.detach()) for p in self.params], self.anchors, self.omegas, self.lam)

    def __len__(self) -> int:
        return len(self.params)

    def zero(self) -> torch.Tensor:
        device = self.omegas[0].device if self.omegas else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)

    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters."""
        if not self.params:
            return self.zero()
        params = self.params if self.local is None else [self.local(p) for p in self.params]
        return torch.ops.mas_kernels.penalty(params, self.anchors, self.omegas, self.lam)[0]

    def add_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (a zero one where it is None); return the penalty."""
        if not self.params:
            return self.zero()
        params = self.params
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            for i, p in enumerate(params):
                if grads[i] is None:
                    p.grad = grads[i] = torch.zeros_like(p)
        if self.local is None:
            return torch.ops.mas_kernels.penalty_grad_(self._detached, self.anchors, self.omegas, self.lam, grads)
        return torch.ops.mas_kernels.penalty_grad_([self.local(p.detach()) for p in params], self.anchors,
                                                   self.omegas, self.lam, [self.local(g) for g in grads])
