r"""The penalty term ``lam * sum Omega (theta - theta*)^2`` over fixed, validated lists.

Built once per set of parameters (the lists are checked then, never per
step), it serves both ways of applying the penalty:

* :meth:`Regularizer.penalty`: the value, differentiable w.r.t. the
  parameters (``loss = task_loss + reg.penalty()``); one fused op whose
  forward already computes the gradient (and whose backward has a
  derivative of its own, for Hessian-vector products);
* :meth:`Regularizer.add_grad_`: after ``backward()``, ``2 lam Omega (theta -
  theta*)`` added into each ``.grad`` in one pass over memory; returns the value.

Every call goes through ``torch.ops.mas_kernels.*``, whose kernels run the
op's guard (``ops/_library.py``). The lists here are fixed, so a call whose
lists were guarded before, unchanged since (the same storages: one
``data_ptr()`` per parameter and per ``.grad``, the same grad and inference
modes), is made through ``prevalidated``: the Python kernels (PyTorch path,
Triton) skip the guard then, and only ``lam`` is checked again. The native
kernels check in C++ on every call, which costs less than that bookkeeping,
so their calls are plain ones.

The op reads the parameters themselves, so whatever storage a parameter has
now (``model.half()``, ``p.data = t``, ``vector_to_parameters``, channels-last)
is what the penalty sees. What the lists fix is each parameter's shape and
device: one ``data_ptr()`` per parameter and step tells that its storage is
the one validated; when it is not, the new layout is validated once more
(same shapes and devices: carry on; else :class:`LayoutChanged`, naming the
parameter, and nothing written).

``MAS`` holds one over its flat Omega/anchor views; ``ShardedPenalty`` one over
this rank's local shards (``local`` maps a parameter to the tensor the op
sees, e.g. a DTensor's local shard).
"""

from __future__ import annotations

import operator
from typing import Callable

import torch

from . import _backend
from .ops._checks import check_scalar
from .ops._library import prevalidated
from .ops.penalty import _check as _check_penalty_args
from .ops.penalty import guard as penalty_grad_guard
from .ops.penalty import penalty_guard, value_dtype


# map() over these costs a third less than the list comprehensions (this runs every training step).
_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")


class LayoutChanged(ValueError):
    """A parameter's shape or device is no longer that of its Omega and theta*."""


class Regularizer:
    """The MAS penalty over ``params`` with fixed ``anchors`` and ``omegas`` (same order).

    Args:
        who: names the caller in error messages.
        params: the parameters (leaf tensors that receive ``.grad``).
        anchors: theta*, one per parameter.
        omegas: Omega, one per parameter.
        lam: lambda.
        local: maps a parameter (or its ``.grad``) to the tensor the op works
            on; ``None`` for the identity.
        local_data: the same without autograd, for the per-step paths (default
            ``local(t.detach())``; a DTensor's raw local tensor costs no dispatch).
        names: the parameters' names, for messages (default ``params[i]``).

    A parameter with ``requires_grad=False`` (frozen) gets neither a gradient
    nor its term from :meth:`add_grad_`, with or without a ``.grad`` (a zero one
    left by ``zero_grad(set_to_none=False)``), so an optimizer holding it does
    not move it.
    """

    def __init__(self, who: str, params: list[torch.Tensor], anchors: list[torch.Tensor],
                 omegas: list[torch.Tensor], lam: float, local: Callable | None = None,
                 names: list[str] | None = None, local_data: Callable | None = None):
        self.who = who
        self.params = list(params)
        self.anchors = list(anchors)
        self.omegas = list(omegas)
        self._lam_t = torch.zeros((), dtype=torch.float64)  # lam for compiled graphs (see lam)
        self.lam = lam
        self.local = local
        self.local_data = local_data or (None if local is None else (lambda t: local(t.detach())))
        self.names = list(names) if names is not None else [f"params[{i}]" for i in range(len(self.params))]
        self._subset: tuple | None = None  # (skipped indices, lists without them), for frozen parameters
        self._positions: dict | None = None  # parameter -> index in the lists (mk.optim's fused steps)
        if self.params:
            _check_penalty_args(who, self._views(), self.anchors, self.omegas, self.lam)
        self._check_grads()
        self._ptrs = self._layout()
        self._layout_version = 0  # moves when a parameter's storage changes (_check_layout)
        self._guarded: tuple | None = None  # the key of the last lists that passed the op's guard

    @property
    def lam(self) -> float:
        """lambda. Eager calls pass it to the op as a number; a graph compiled by ``torch.compile`` reads it
        from a 0-d tensor that this setter updates in place, so a new lam (a schedule) reuses the graph
        (a number would be baked into it: one recompilation per value)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = float(value)
        self._lam_t.fill_(self._lam)

    def _check_grads(self) -> None:
        # A .grad assigned later is checked by PyTorch; one left from before p.data changed shape is not.
        for name, p in zip(self.names, self.params):
            g = p.grad
            if g is not None and g.shape != p.shape:
                raise ValueError(
                    f"{self.who}: parameter {name!r} is now {tuple(p.shape)} but its .grad is still "
                    f"{tuple(g.shape)}; clear it (optimizer.zero_grad(set_to_none=True), or p.grad = None)")

    def __len__(self) -> int:
        return len(self.params)

    def _views(self) -> list[torch.Tensor]:
        if self.local is None:
            return [p.detach() for p in self.params]
        return [self.local_data(p) for p in self.params]

    def _layout(self) -> list[int]:
        if self.local is None:
            return list(map(_data_ptr, self.params))
        return [self.local_data(p).data_ptr() for p in self.params]

    def check_layout(self) -> None:
        """Validate the parameters' storage again if any changed since the last check (cheap otherwise).

        Raises :class:`LayoutChanged` naming the first parameter whose shape
        or device differs from its Omega's; dtype and strides may change freely.
        """
        if not torch.compiler.is_compiling():  # under compile, dynamo guards on shapes and devices itself
            self._check_layout()

    def _check_layout(self) -> None:
        ptrs = self._layout()
        if ptrs == self._ptrs:
            return
        for name, p, o in zip(self.names, self._views(), self.omegas):
            if p.shape != o.shape or p.device != o.device:
                raise LayoutChanged(
                    f"{self.who}: parameter {name!r} is now {tuple(p.shape)} on {p.device}, but its importance "
                    f"and theta* are {tuple(o.shape)} on {o.device}")
        self._check_grads()
        self._ptrs = ptrs
        self._layout_version += 1

    def positions(self) -> dict:
        """``{parameter: i}`` over the lists, built once (the lists are fixed): how ``mk.optim``'s fused
        steps find each parameter's theta* and Omega (``anchors[i]``, ``omegas[i]``)."""
        if self._positions is None:
            self._positions = {p: i for i, p in enumerate(self.params)}
        return self._positions

    def zero(self) -> torch.Tensor:
        """A zero penalty, of the dtype and device the op's value would have (float64 for float64 state)."""
        device = self.omegas[0].device if self.omegas else torch.device("cpu")
        return torch.zeros((), dtype=value_dtype(self.params, self.anchors, self.omegas), device=device)

    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters."""
        if not self.params:
            return self.zero()
        self.check_layout()
        params = self.params if self.local is None else [self.local(p) for p in self.params]
        if torch.compiler.is_compiling():
            # lam * (the penalty at lam = 1): lam a runtime value of the graph (see lam); the op's
            # backward scales its gradient by the incoming lam * grad, so gradients are lam's too.
            value = torch.ops.mas_kernels.penalty(params, self.anchors, self.omegas, 1.0)[0]
            return value * self._lam_t.to(value.dtype)
        return self._call(torch.ops.mas_kernels.penalty, penalty_guard, params, None)[0]

    def add_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (a zero one where it is None);
        return the penalty."""
        if not self.params:
            return self.zero()
        params, anchors, omegas = self.params, self.anchors, self.omegas
        if torch.compiler.is_compiling():
            grads = [p.grad for p in params]  # dynamo traces this, not attrgetter (and guards the layout itself)
            frozen = not all(p.requires_grad for p in params)
        else:
            self._check_layout()
            grads = list(map(_grad, params))
            frozen = not all(map(_requires_grad, params))
        if frozen or any(g is None for g in grads):
            params, anchors, omegas, grads = self._fill(grads)
            if not params:
                return self.zero()
        # The op's Autograd key is a fallthrough: parameters that require grad need no detach.
        if self.local is not None:  # the training step: local shards without autograd (FSDP2)
            local = self.local_data
            params, grads = [local(p) for p in params], [local(g) for g in grads]
        if torch.compiler.is_compiling():
            # lam a runtime value of the graph (see lam): the gradient at lam = 1 (fresh buffers, from the
            # same fused op), scaled by the lam tensor and added; no recompilation per lam, at the price of
            # two more passes over the gradients than the eager call's one.
            value, unit = torch.ops.mas_kernels.penalty([p.detach() for p in params], anchors, omegas, 1.0)
            lam = self._lam_t.to(value.dtype)
            torch._foreach_add_(grads, torch._foreach_mul(unit, lam))
            return value * lam
        return self._call(torch.ops.mas_kernels.penalty_grad_, penalty_grad_guard, params, grads, anchors, omegas)

    def _call(self, op, guard, params, grads, anchors=None, omegas=None):
        """``op(params, anchors, omegas, lam[, grads])``; through ``prevalidated`` when these lists passed
        the guard before (see the module docstring), else after the guard (then remembered)."""
        anchors = self.anchors if anchors is None else anchors
        omegas = self.omegas if omegas is None else omegas
        args = (params, anchors, omegas, self.lam) + (() if grads is None else (grads,))
        if torch.compiler.is_compiling() or _backend.choose(omegas[0].device) == "native":
            return op(*args)
        subset = () if anchors is self.anchors else self._subset[0]  # frozen parameters left out (_fill)
        key = (op, self._layout_version, subset, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               None if grads is None else tuple(map(_data_ptr, grads)))
        if key == self._guarded:
            check_scalar(self.who, "lam", self.lam, scale=2.0)
        else:
            guard(*args)
            self._guarded = key
        return prevalidated(op, *args)

    def _fill(self, grads: list) -> tuple[list, list, list, list]:
        """Zeros for the missing ``.grad`` of parameters that require grad; frozen ones are left out. A
        parameter listed twice gets one buffer (found again through ``.grad``)."""
        skipped = []
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                skipped.append(i)
                continue
            if grads[i] is None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads[i] = p.grad
        if not skipped:
            return self.params, self.anchors, self.omegas, grads
        key = tuple(skipped)
        if self._subset is None or self._subset[0] != key:
            keep = [i for i in range(len(self.params)) if i not in set(skipped)]
            self._subset = (key, [self.params[i] for i in keep], [self.anchors[i] for i in keep],
                            [self.omegas[i] for i in keep], keep)
        _, params, anchors, omegas, keep = self._subset
        return params, anchors, omegas, [grads[i] for i in keep]
