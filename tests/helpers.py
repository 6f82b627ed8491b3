"""What the tests share: dtypes and tolerances, a comparison that prints the worst elements, tensor layouts.

Every comparison is against ``tests/reference.py`` (float64, from the same
low-precision inputs), so the only differences allowed are float32
accumulation and, for outputs stored in fp16/bf16, one rounding to that dtype.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck

from mas_kernels import _backend

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


