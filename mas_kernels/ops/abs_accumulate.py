r"""``abs_accumulate_``: ``omega_i += alpha * |t_i|`` for lists of tensors.

.. math:: \Omega_i \mathrel{+}= \alpha\, |t_i| \qquad i = 1..T

Serves batch-level global MAS (``t = grad`` of ``||F(x)||^2`` for a batch, the
paper's released code), and any parameter without a factorized rule. On CUDA
all tensors are done in one launch per input dtype (an address table, see
``ops/triton/_table.py``).
"""

from __future__ import annotations

import torch

from ._checks import (ACC_DTYPES, check_like, check_list, check_no_overlap, check_not_requiring_grad, check_outputs,
                      check_same_device, check_scalar, check_tensor, native_checks)
from ._library import define, prevalidated

OP = "abs_accumulate_"


def _check(omegas, tensors, alpha) -> tuple[list, list, float]:
    omegas = check_list(OP, "omegas", omegas, None)
    tensors = check_list(OP, "tensors", tensors, len(omegas), "omegas")
    for i, (o, t) in enumerate(zip(omegas, tensors)):
        check_tensor(OP, "omegas", o, i, dtypes=ACC_DTYPES)
        check_tensor(OP, "tensors", t, i)
        check_like(OP, "tensors", t, "omegas", o, i)
    if omegas:
        check_same_device(OP, "omegas", omegas, omegas[0].device)
    check_not_requiring_grad(OP, "omegas", omegas)
    alpha = check_scalar(OP, "alpha", alpha, nonnegative=True)
    check_outputs(OP, "omegas", omegas)
    check_no_overlap(OP, "omegas", omegas, [("tensors", tensors)], elementwise=True)
    return omegas, tensors, alpha


def guard(omegas, tensors, alpha) -> None:
    """Everything ``abs_accumulate_`` checks, in front of every kernel (see ``_library``), before any write
    (in C++ where the native extension is built: the same checks, see ``_checks``)."""
    native = native_checks()
    if native is not None:
        native.guard_abs_accumulate(omegas, tensors, alpha)
        return
    _check(omegas, tensors, alpha)


def abs_accumulate_torch(omegas: list[torch.Tensor], tensors: list[torch.Tensor], alpha: float) -> None:
    """The readable definition: one ``add_`` per tensor, in the omega's dtype."""
    for o, t in zip(omegas, tensors):
        o.add_(t.abs().to(o.dtype), alpha=alpha)


def _fake(omegas, tensors, alpha) -> None:
    return None


define("abs_accumulate_(Tensor(a!)[] omegas, Tensor[] tensors, float alpha) -> ()", _fake,
       {"torch": f"{__name__}:abs_accumulate_torch",
        "triton": "mas_kernels.ops.triton.multi_tensor:abs_accumulate_triton"},
       guard=guard, mutated=(0,))


def abs_accumulate_(omegas, tensors, alpha: float = 1.0) -> list[torch.Tensor]:
    r"""``omega_i += alpha * |t_i|`` in place for every pair; returns ``omegas``.

    Args:
        omegas: list of float32 or float64 tensors, all on one device, updated in place
            (``|t_i|`` is rounded to the omega's dtype, then added in it).
        tensors: list of float32/float16/bfloat16/float64 tensors, ``tensors[i]`` with
            ``omegas[i]``'s shape and device.
        alpha: scale, >= 0.

    Not differentiable. Raises ``ValueError`` naming the list and index at
    fault before any ``omega`` is touched, the same on every backend and
    through ``torch.ops.mas_kernels.abs_accumulate_`` (also when an ``omega``
    requires grad with grad mode on, has elements sharing memory, e.g. an
    expanded view, shares memory with another omega or with a tensor other
    than its own entry's, or is an inference tensor outside
    ``torch.inference_mode()``, and when ``alpha`` is negative, not finite or
    overflows float32). Empty lists and empty tensors are fine. An ``omega``
    listed twice is added to twice, as one call per pair in order would.
    """
    omegas, tensors, alpha = _check(omegas, tensors, alpha)
    if not omegas:
        return omegas
    prevalidated(torch.ops.mas_kernels.abs_accumulate_, omegas, tensors, alpha)
    return omegas
