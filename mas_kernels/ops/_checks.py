"""Argument checks shared by the ops.

Every check runs before anything is written, and every message names the op,
the argument and (for lists) the index at fault, so a bad call leaves its
outputs exactly as they were.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: What an accumulation's output (Omega, an accumulator) may be: the products are taken in its dtype.
ACC_DTYPES = (torch.float32, torch.float64)


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The dtype the ops compute in for tensors that meet in one formula: float64 when any of them
    is float64 (exact to float64 rounding, for float64 models and tests), else float32."""
    for t in ts:
        if t.dtype is torch.float64:
            return torch.float64
    return torch.float32


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


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_scalar(op: str, arg: str, x, scale: float = 1.0) -> float:
    """``x`` as a Python float; ``ValueError`` unless it is a finite number whose ``scale`` multiple fits float32.

    The kernels compute in float32 (a GPU kernel's scalar argument, the C++
    loops): 1e39 would be inf there and a NaN poisons every element, so
    both are refused here, the same on every backend. ``scale``: the multiple
    the kernel actually uses (2 for ``lam``, whose gradient scale is ``2 lam``).
    """
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{op}: {arg} must be a number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, (str, bytes)) or x is None:
        raise ValueError(f"{op}: {arg} must be a number, got {type(x).__name__} {x!r}")
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {arg} must be a number, got {type(x).__name__}") from None
    if not math.isfinite(value) or abs(value) * scale > FLOAT32_MAX:
        what = "finite" if not math.isfinite(value) else f"at most {FLOAT32_MAX / scale:.4g} in magnitude"
        raise ValueError(f"{op}: {arg}={value!r} must be {what} (the kernels compute in float32); "
                         f"pass a smaller {arg}")
    return value


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded or stride-0 view): writes would collide."""
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1


def check_output(op: str, arg: str, t: torch.Tensor, index: int | None = None) -> None:
    """``t`` can be written in place element by element: no inference tensor outside
    inference mode (PyTorch forbids the update) and no element sharing memory with another.

    Skipped while torch.compile traces (dynamo cannot trace these queries): the
    compiled graph calls the registered kernel, whose guard makes the same checks.
    """
    if torch.compiler.is_compiling():
        return
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{op}: {_name(arg, index)} is an inference tensor (made under torch.inference_mode()), which "
            "PyTorch does not let anything update in place outside inference mode; call the op inside "
            f"torch.inference_mode(), or pass a normal tensor ({_name(arg, index)}.clone() outside it)"
        )
    if _overlaps_itself(t):
        raise ValueError(
            f"{op}: {_name(arg, index)} has elements that share memory (an expanded or stride-0 view, "
            f"strides {tuple(t.stride())}), so the in-place update would write them more than once; "
            f"pass {_name(arg, index)}.contiguous() (or clone()) and copy the result back"
        )


def check_outputs(op: str, arg: str, ts: list) -> None:
    """:func:`check_output` for each tensor of a list (the common case, contiguous tensors
    outside inference mode, costs one attribute read per tensor)."""
    if torch.compiler.is_compiling():
        return
    inference = torch.is_inference_mode_enabled()
    for i, t in enumerate(ts):
        if (not inference and t.is_inference()) or not t.is_contiguous():
            check_output(op, arg, t, i)


def span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[first, last)`` that ``t``'s elements occupy (strides are >= 0 in PyTorch)."""
    first = t.data_ptr()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return first, first + extent * t.element_size()


def shares_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the memory ranges of ``x`` and ``y`` overlap (conservative: interleaved views count)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    (a0, a1), (b0, b1) = span(x), span(y)
    return a0 < b1 and b0 < a1


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
