"""What the tests share: dtypes and tolerances, a comparison that prints the worst elements, tensor layouts,
one checker per op, and the bad-input helpers.

Every comparison is against ``tests/reference.py`` (float64, from the same
low-precision inputs), so the only differences allowed are float32
accumulation and, for outputs stored in fp16/bf16, one rounding to that dtype.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck

import mas_kernels as mk
from mas_kernels import _backend
from tests import reference as ref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F16, BF16]

# (dtype, atol, rtol) for a result *stored* in ``dtype`` and computed in fp32 from
# inputs whose float64 reference is exact. rtol is relative to the sum of the
# magnitudes of the terms (see ``assert_close``): fp32 accumulation slack, plus one
# rounding to the output dtype (half an ulp: 2**-11 for fp16, 2**-8 for bf16).
OUT_TOLS = [
    (F32, 1e-6, 1e-5),
    (F16, 1e-6, 2.0**-11 + 1e-5),
    (BF16, 1e-6, 2.0**-8 + 1e-5),
    (F64, 0.0, 1e-12),  # float64 in, float64 math: float64 rounding only
]
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in OUT_TOLS}


def out_tol(dtype):
    """``(atol, rtol)`` for an output stored in ``dtype`` by the implementation now selected."""
    atol, rtol = TOL[dtype]
    if dtype == BF16 and _backend.choose(torch.device("cpu")) == "triton" and _backend.interpreting():
        # The Triton interpreter converts fp32 -> bf16 by truncation (round toward
        # zero) where a GPU rounds to nearest even: allow one whole bf16 ulp.
        rtol = 2.0**-7 + 1e-5
    return atol, rtol


HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LAYOUTS = ["contiguous", "transposed", "step2", "offset"]


# ------------------------------------------------------------------- helpers
def assert_close(actual, expected, scale=None, *, dtype=None, atol=None, rtol=None, name="result"):
    """``|actual - expected| <= atol + rtol * scale`` elementwise, printing the worst mismatches.

    ``expected`` is the float64 reference; ``scale`` bounds the magnitude of the
    terms that were summed (defaults to ``|expected|``); ``atol``/``rtol`` default
    to ``out_tol(dtype)`` with ``dtype`` the dtype ``actual`` is stored in.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = dtype or actual.dtype
    d_atol, d_rtol = out_tol(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    actual = actual.detach().cpu().to(F64)
    expected = expected.detach().cpu().to(F64)
    scale = expected.abs() if scale is None else scale.detach().cpu().to(F64)
    err = (actual - expected).abs()
    bound = atol + rtol * scale
    bad = ~(err <= bound)  # NaN counts as a mismatch
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        rows = "\n".join(
            f"  at {tuple(i)}: got {actual[tuple(i)].item()!r}, expected {expected[tuple(i)].item()!r}, "
            f"|err| {err[tuple(i)].item():.3g} > {bound[tuple(i)].item():.3g}"
            for i in idx
        )
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ ({dtype}):\n{rows}")


def make(shape, dtype=F32, layout="contiguous", *, device="cpu", fill=torch.randn):
    """A tensor of ``shape``/``dtype`` with values ``fill`` laid out as ``layout``.

    ``transposed``: a transposed view (last two dims); ``step2``: every other
    element of the last dim; ``offset``: contiguous but not at its storage's start.
    ``fill``: a function like ``torch.randn``, or ``"randn"`` / ``"rand"``
    (non-negative values, like an importance Omega).
    """
    if isinstance(fill, str):
        fill = {"randn": torch.randn, "rand": torch.rand}[fill]
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = fill(*shape[:-2], shape[-1], shape[-2]).to(dtype)
        t = base.transpose(-1, -2)
    elif layout == "step2" and len(shape) >= 1:
        base = fill(*shape[:-1], 2 * shape[-1] + 1).to(dtype)
        t = base[..., : 2 * shape[-1] : 2]
    elif layout == "offset":
        n = math.prod(shape)
        t = fill(n + 3).to(dtype)[3:].view(shape)
    else:
        t = fill(*shape).to(dtype) if shape else fill(()).to(dtype)
    assert t.shape == shape
    if t.numel() > 1 and (
        (layout == "transposed" and len(shape) >= 2 and min(shape[-2:]) > 1)
        or (layout == "step2" and len(shape) >= 1 and shape[-1] > 1)
    ):
        assert not t.is_contiguous()
    return t.to(device)


# ------------------------------------------------------------------- the ops against the reference
# One checker per op: it computes the float64 reference first (on CPU copies),
# calls the public op, and asserts everything the op promises about its outputs.
def check_abs_outer(omega, a, b, alpha):
    """``mk.abs_outer_accumulate_``: returns ``omega`` itself, still fp32, equal to ``ref.abs_outer``.

    The tolerance is relative to the magnitudes of the summed terms,
    ``|omega| + |alpha| |a|^T |b|``.
    """
    expected = ref.abs_outer(omega.cpu(), a.cpu(), b.cpu(), alpha)
    scale = omega.cpu().to(F64).abs() + abs(alpha) * (a.cpu().to(F64).abs().T @ b.cpu().to(F64).abs())
    out = mk.abs_outer_accumulate_(omega, a, b, alpha)
    assert out is omega
    assert omega.dtype == F32
    assert_close(omega, expected, scale, name="omega")


def check_abs_accumulate(omegas, tensors, alpha):
    """``mk.abs_accumulate_``: returns the same omegas, in place, fp32, each equal to ``ref.abs_accumulate``.

    The tolerance is relative to the result's own magnitude (tighter than to
    the terms' ``|omega| + |alpha| |t|`` when alpha < 0 cancels).
    """
    expected = ref.abs_accumulate([o.cpu() for o in omegas], [t.cpu() for t in tensors], alpha)
    ids = [id(o) for o in omegas]
    out = mk.abs_accumulate_(omegas, tensors, alpha)
    assert [id(o) for o in out] == ids
    for i, (o, e) in enumerate(zip(omegas, expected)):
        assert o.dtype == F32
        assert_close(o, e, name=f"omegas[{i}]")


def expected_penalty(params, anchors, omegas, lam, grads):
    """(value, new grads, grad scales) from the reference, on CPU.

    A grad's scale is the magnitude of the two terms of ``g + 2 lam omega d``.
    """
    cpu = lambda xs: [x.detach().cpu() for x in xs]  # noqa: E731
    value, new_grads = ref.penalty_and_grads(cpu(params), cpu(anchors), cpu(omegas), lam, cpu(grads))
    scales = [
        g.abs().to(F64) + 2 * abs(lam) * o.abs().to(F64) * (p.to(F64) - a.to(F64)).abs()
        for p, a, o, g in zip(cpu(params), cpu(anchors), cpu(omegas), cpu(grads))
    ]
    return value, new_grads, scales


def check_penalty_grad(params, anchors, omegas, lam, grads):
    """``mk.penalty_grad_`` with explicit ``grads``; returns the value it gave.

    The value is an fp32 scalar equal to ``ref.penalty_and_grads``'s (relative
    to ``|lam| sum |omega| d^2``); each grad is updated in place (same tensor,
    dtype and strides) to the reference's ``g + 2 lam omega d``.
    """
    value, new_grads, scales = expected_penalty(params, anchors, omegas, lam, grads)
    value_scale = abs(lam) * sum(
        ((o.detach().cpu().to(F64).abs() * (p.detach().cpu().to(F64) - a.detach().cpu().to(F64)) ** 2).sum()
         for p, a, o in zip(params, anchors, omegas)),
        torch.zeros((), dtype=F64),
    )
    before = [(id(g), g.dtype, g.stride()) for g in grads]
    out = mk.penalty_grad_(params, anchors, omegas, lam, grads)
    assert [(id(g), g.dtype, g.stride()) for g in grads] == before
    assert out.dim() == 0 and out.dtype == F32
    assert_close(out, value, value_scale, dtype=F32, name="value")
    for i, (g, e, s) in enumerate(zip(grads, new_grads, scales)):
        assert_close(g, e, s, name=f"grads[{i}]")
    return out


def penalty_inputs(shapes, p_dtype=F32, a_dtype=None, g_dtype=None, *, layout="contiguous",
                   anchor_layout="contiguous", omega_layout="contiguous", grad_layout=None, device="cpu"):
    """``(params, anchors, omegas, grads)``, one tensor of each per shape.

    params in ``p_dtype``, anchors in ``a_dtype`` and grads in ``g_dtype``
    (both default ``p_dtype``), omegas fp32 and non-negative. Each ``*layout``
    is one of ``LAYOUTS`` for the whole list or a list of one per shape;
    ``grad_layout`` defaults to ``layout``.
    """
    a_dtype = a_dtype or p_dtype
    g_dtype = g_dtype or p_dtype
    grad_layout = layout if grad_layout is None else grad_layout

    def each(lay):
        return [lay] * len(shapes) if isinstance(lay, str) else list(lay)

    params = [make(s, p_dtype, lay, device=device) for s, lay in zip(shapes, each(layout))]
    anchors = [make(s, a_dtype, lay, device=device) for s, lay in zip(shapes, each(anchor_layout))]
    omegas = [make(s, F32, lay, device=device, fill="rand") for s, lay in zip(shapes, each(omega_layout))]
    grads = [make(s, g_dtype, lay, device=device) for s, lay in zip(shapes, each(grad_layout))]
    return params, anchors, omegas, grads


# ------------------------------------------------------------------- bad input
def assert_names(exc: pytest.ExceptionInfo, name: str) -> None:
    """The message names ``name`` as a whole token (``omegas[2]``, not ``omegas[2]`` inside ``omegas[21]``)."""
    msg = str(exc.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\[])", msg), f"{name!r} not named in: {msg}"


def snapshot(ts):
    """Copies of the tensors (``None`` stays ``None``), to compare with after a call that must fail."""
    return [None if t is None else t.detach().clone() for t in ts]


def assert_unchanged(ts, before, what):
    """Each tensor equals its ``snapshot`` (meta tensors have no values to compare); a ``None`` stayed ``None``."""
    for i, (t, b) in enumerate(zip(ts, before)):
        if b is None:
            assert t is None, f"{what}[{i}] was allocated by a call that failed"
        elif t.device.type != "meta":
            assert torch.equal(t, b), f"{what}[{i}] was written by a call that failed"
