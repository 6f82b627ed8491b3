r"""``abs_accumulate_``: ``omega_i += alpha * |t_i|`` for lists of tensors.

.. math:: \Omega_i \mathrel{+}= \alpha\, |t_i| \qquad i = 1..T

Serves batch-level global MAS (``t = grad`` of ``||F(x)||^2`` for a batch, the
paper's released code), and any parameter without a factorized rule. On CUDA
all tensors are done in one launch per input dtype (an address table, see
``ops/triton/_table.py``).
"""

from __future__ import annotations

import torch

from ._checks import check_like, check_list, check_not_requiring_grad, check_same_device, check_scalar, check_tensor
from ._library import define

OP = "abs_accumulate_"


def _check(omegas, tensors, alpha) -> tuple[list, list, float]:
    omegas = check_list(OP, "omegas", omegas, None)
    tensors = check_list(OP, "tensors", tensors, len(omegas), "omegas")
    for i, (o, t) in enumerate(zip(omegas, tensors)):
        check_tensor(OP, "omegas", o, i, dtypes=(torch.float32,))
        check_tensor(OP, "tensors", t, i)
        check_like(OP, "tensors", t, "omegas", o, i)
    if omegas:
        check_same_device(OP, "omegas", omegas, omegas[0].device)
    check_not_requiring_grad(OP, "omegas", omegas)
    return omegas, tensors, check_scalar(OP, "alpha", alpha)


def abs_accumulate_torch(omegas: list[torch.Tensor], tensors: list[torch.Tensor], alpha: float) -> None:
    """The readable definition: one ``add_`` per tensor."""
    for o, t in zip(omegas, tensors):
        o.add_(t.abs().float(), alpha=alpha)


def _fake(omegas, tensors, alpha) -> None:
    return None


define("abs_accumulate_(Tensor(a!)[] omegas, Tensor[] tensors, float alpha) -> ()", _fake,
       {"torch": f"{__name__}:abs_accumulate_torch",
        "triton": "mas_kernels.ops.triton.multi_tensor:abs_accumulate_triton"},
       mutated=(0,))


def abs_accumulate_(omegas, tensors, alpha: float = 1.0) -> list[torch.Tensor]:
    r"""``omega_i += alpha * |t_i|`` in place for every pair; returns ``omegas``.

    Args:
        omegas: list of float32 tensors, all on one device, updated in place.
        tensors: list of float32/float16/bfloat16 tensors, ``tensors[i]`` with
            ``omegas[i]``'s shape and device.
        alpha: scale.

    Not differentiable. Raises ``ValueError`` naming the list and index at
    fault (also when an ``omega`` requires grad with grad mode on) before any
    ``omega`` is touched. Empty lists and empty tensors are fine.
    """
    omegas, tensors, alpha = _check(omegas, tensors, alpha)
    if not omegas:
        return omegas
    torch.ops.mas_kernels.abs_accumulate_(omegas, tensors, alpha)
    return omegas
