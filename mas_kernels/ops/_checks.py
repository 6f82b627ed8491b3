"""Argument checks shared by the ops.

Every check runs before anything is written, and every message names the op,
the argument and (for lists) the index at fault, so a bad call leaves its
outputs exactly as they were.
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _name(arg: str, index: int | None) -> str:
    return arg if index is None else f"{arg}[{index}]"


def check_tensor(op: str, arg: str, t, index: int | None = None, *, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {_name(arg, index)} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {_name(arg, index)} has dtype {t.dtype}, expected {allowed}")


def check_like(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor, index: int | None = None) -> None:
    """``t`` must have ``ref``'s shape and device."""
    if t.shape != ref.shape:
        raise ValueError(
            f"{op}: {_name(arg, index)} has shape {tuple(t.shape)} but {_name(ref_arg, index)} "
            f"has shape {tuple(ref.shape)}"
        )
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {_name(arg, index)} is on {t.device} but {_name(ref_arg, index)} is on {ref.device}"
        )


def check_list(op: str, arg: str, xs, n: int | None, ref_arg: str | None = None) -> list:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise ValueError(f"{op}: {arg} must be a list or tuple of tensors, got {type(xs).__name__}")
    xs = list(xs)
    if n is not None and len(xs) != n:
        raise ValueError(f"{op}: {arg} has {len(xs)} tensors but {ref_arg} has {n}")
    return xs


def check_same_device(op: str, arg: str, xs: list, device: torch.device) -> None:
    for i, t in enumerate(xs):
        if t.device != device:
            raise ValueError(f"{op}: {arg}[{i}] is on {t.device} but {arg}[0] is on {device}")


def check_scalar(op: str, arg: str, x) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{op}: {arg} must be a number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {arg} must be a number, got {type(x).__name__}") from None


def check_not_requiring_grad(op: str, arg: str, xs) -> None:
    """The in-place accumulations are not differentiable: with grad mode on, what
    they write into must not require grad (autograd would not see the update,
    and gradients through it would be silently wrong)."""
    if not torch.is_grad_enabled():
        return
    if isinstance(xs, torch.Tensor):
        if xs.requires_grad:
            raise ValueError(f"{op}: {arg} requires grad, but the op writes into it in place and is not "
                             f"differentiable; pass {arg}.detach() or call it under torch.no_grad()")
        return
    for i, t in enumerate(xs):
        if t.requires_grad:
            raise ValueError(f"{op}: {arg}[{i}] requires grad, but the op writes into it in place and is not "
                             f"differentiable; pass detached tensors or call it under torch.no_grad()")
