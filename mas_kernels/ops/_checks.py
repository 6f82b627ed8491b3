"""Argument checks shared by the ops.

Every check runs before anything is written, and every message names the op,
the argument and (for lists) the index at fault, so a bad call leaves its
outputs exactly as they were.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

from .. import _native

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
    """``arg`` for a single tensor, ``arg[index]`` for a list entry; an ``arg`` with ``{}`` in it is a
    pattern for the entry's name (``"params[{}].grad"``)."""
    if index is None:
        return arg
    return arg.format(index) if "{}" in arg else f"{arg}[{index}]"


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


def check_scalar(op: str, arg: str, x, scale: float = 1.0, *, nonnegative: bool = False) -> float:
    """``x`` as a Python float; ``ValueError`` unless it is a finite number whose ``scale`` multiple fits float32
    (and, with ``nonnegative``, is >= 0).

    The kernels compute in float32 (a GPU kernel's scalar argument, the C++
    loops): 1e39 would be inf there and a NaN poisons every element, so
    both are refused here, the same on every backend. ``scale``: the multiple
    the kernel actually uses (2 for ``lam``, whose gradient scale is ``2 lam``).
    ``nonnegative``: the accumulations' ``alpha``, since importance is a sum of
    terms >= 0 (a negative scale would make Omega shrink or turn negative).
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
    if nonnegative and value < 0:
        raise ValueError(f"{op}: {arg}={value!r} must be >= 0: the op accumulates importance, a sum of terms "
                         f">= 0, which a negative {arg} would make shrink or turn negative")
    return value


# ------------------------------------------------------------------------ memory
# "Overlap" is real memory overlap: two elements at the same address (a
# stride-0 or expanded view, ``as_strided((3, 3), (1, 1))``), an output sharing
# an element with an input or another output. Two views whose byte ranges
# interleave without a common element (the two column halves of a matrix) do
# not overlap. The common cases cost one attribute read or a byte-range
# comparison; only tensors whose ranges interleave get the exact test, which
# enumerates element addresses (up to EXACT_LIMIT elements; beyond it an
# interleaving counts as an overlap).
#
# Where the native extension is built, these checks (and the ops' kernel
# guards) run their C++ copy (csrc/guard.cpp, the code the native kernels'
# guards run): 1-2 us per list entry less than this Python, which matters for
# a 161-tensor penalty call through a front door or a compiled graph. The
# Python code is the definition, and the fallback where the extension is not
# built; the tests run both.
EXACT_LIMIT = 1 << 24
#: Whether the checks run in C++ (None: where the extension is built; tests set it).
USE_NATIVE: bool | None = None
_EMPTY = torch.empty(0)


def native_checks():
    """The native extension, whose guards and address checks the Python ones may call; None where it is
    not built (or ``USE_NATIVE`` is False)."""
    if USE_NATIVE is False or (USE_NATIVE is None and not _native.built()):
        return None
    return _native.lib()


def _is_meta(t: torch.Tensor) -> bool:
    return t.is_meta


def span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[first, last)`` that ``t``'s elements occupy (strides are >= 0 in PyTorch)."""
    first = t.data_ptr()
    if t.is_contiguous():
        return first, first + t.numel() * t.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return first, first + extent * t.element_size()


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The byte address of every element of ``t`` (int64, on the CPU; ``t`` non-empty)."""
    off = torch.zeros((), dtype=torch.int64)
    for n, s in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
    return off.reshape(-1) * t.element_size() + t.data_ptr()


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (exact; see the section's comment)."""
    if t.numel() <= 1 or t.is_contiguous() or _is_meta(t):
        return False
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    extent = 1
    for stride, n in dims:
        if stride < extent:
            break  # the dims so far do not clear each other: test the addresses
        extent += stride * (n - 1)
    else:
        return False  # each stride clears the extent of the smaller ones: all addresses distinct
    if dims[0][0] == 0 or t.numel() > EXACT_LIMIT:
        return True
    native = native_checks()
    if native is not None:
        return native.overlaps_itself(t)
    return int(torch.unique(_offsets(t)).numel()) < t.numel()


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.data_ptr() == y.data_ptr() and x.dtype == y.dtype and x.shape == y.shape
            and x.stride() == y.stride())


def _share_elements(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether some byte of an element of ``x`` is a byte of an element of ``y`` (their ranges interleave)."""
    if x.numel() + y.numel() > EXACT_LIMIT:
        return True
    xs = torch.unique(_offsets(x))  # sorted
    ys = _offsets(y)
    # For each element of y, the last element of x starting before y's element ends overlaps it iff it
    # ends after y's element starts.
    k = torch.searchsorted(xs, ys + y.element_size()) - 1
    hit = (k >= 0) & (xs[k.clamp(min=0)] + x.element_size() > ys)
    return bool(hit.any())


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
    if overlaps_itself(t):
        raise ValueError(
            f"{op}: {_name(arg, index)} has elements that share memory (an expanded, stride-0 or overlapping "
            f"as_strided view: shape {tuple(t.shape)}, strides {tuple(t.stride())}), so the in-place update "
            f"would write them more than once; pass {_name(arg, index)}.contiguous() (or clone()) and copy the "
            "result back"
        )


def check_outputs(op: str, arg: str, ts: list) -> None:
    """:func:`check_output` for each tensor of a list (``None`` entries are skipped: fresh buffers); the
    common case, contiguous tensors outside inference mode, costs one attribute read per tensor."""
    if torch.compiler.is_compiling():
        return
    inference = torch.is_inference_mode_enabled()
    for i, t in enumerate(ts):
        if t is not None and ((not inference and t.is_inference()) or not t.is_contiguous()):
            check_output(op, arg, t, i)


def check_no_overlap(op: str, out_arg: str, outs: list, ins: list[tuple[str, list]], *,
                     elementwise: bool, index: bool = True) -> None:
    """Refuse outputs that share memory with an input or with another output (see the section's comment).

    ``outs``: the written tensors (``None`` entries, fresh buffers, skipped);
    ``ins``: ``(name, tensors)`` of the lists read, ``tensors[i]`` going with
    ``outs[i]``. Allowed: an output listed twice as the very same view (each
    entry is applied in turn), and, for ``elementwise`` ops, an output that is
    the very same view as an input of its own entry (each element is read
    before it is written, by whoever writes it). ``index``: name list entries
    (``omegas[2]``) or not (a single ``omega``).
    """
    if torch.compiler.is_compiling():
        return  # traced (fake) tensors have no addresses; the compiled graph's kernel checks them
    native = native_checks()
    if native is not None:
        native.check_no_overlap(op, out_arg, [_EMPTY if t is None else t for t in outs], [arg for arg, _ in ins],
                                [list(ts) for _, ts in ins], elementwise, index)
        return
    name = _name if index else (lambda arg, i: arg)
    spans = []  # (first, last, i, t) of the outputs
    for i, t in enumerate(outs):
        if t is not None and t.numel() and not _is_meta(t):
            lo, hi = span(t)
            spans.append((lo, hi, i, t))
    if not spans:
        return
    spans.sort(key=lambda e: (e[0], e[1]))
    active: list[tuple[int, int, int, torch.Tensor]] = []
    for e in spans:
        active = [a for a in active if a[1] > e[0]]
        for a in active:
            if not _same_view(a[3], e[3]) and _share_elements(a[3], e[3]):
                i, j = sorted((a[2], e[2]))
                raise ValueError(
                    f"{op}: {name(out_arg, i)} and {name(out_arg, j)} share memory, so updating one changes the "
                    f"other midway; pass separate tensors (the same tensor listed twice is fine: it gets both "
                    "updates, in order)")
        active.append(e)
    firsts = [e[0] for e in spans]
    reach, top = [], 0  # reach[k]: the highest end among the outputs sorted before k + 1
    for e in spans:
        top = max(top, e[1])
        reach.append(top)
    for arg, ts in ins:
        for i, t in enumerate(ts):
            if t is None or not t.numel() or _is_meta(t):
                continue
            lo, hi = span(t)
            k = bisect.bisect_left(firsts, hi) - 1
            while k >= 0 and reach[k] > lo:
                olo, ohi, oi, o = spans[k]
                k -= 1
                if ohi <= lo or (elementwise and oi == i and _same_view(o, t)) or not _share_elements(o, t):
                    continue
                raise ValueError(
                    f"{op}: {name(out_arg, oi)} shares memory with {name(arg, i)}, which the op reads while it "
                    f"writes {name(out_arg, oi)}; pass {name(arg, i)}.clone()")


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
        if t is not None and t.requires_grad:
            raise ValueError(f"{op}: {_name(arg, i)} requires grad, but the op writes into it in place and is "
                             f"not differentiable; pass detached tensors or call it under torch.no_grad()")
