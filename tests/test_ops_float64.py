"""float64 in every op, on every backend: the results of the float64 formula, to float64 rounding.

A float64 model keeps Omega, theta* and its accumulators in float64, so its
importance and penalty can be checked to 1e-12 relative; with float32 or
16-bit tensors beside a float64 one, the ops compute in float64 where the
float64 tensor meets the formula (``penalty_grad_``: per entry; the
accumulations: in omega's dtype). Expected values come from
``tests/reference.py`` (float64 loops), with the tolerance relative to the
magnitudes of the summed terms.
"""

from __future__ import annotations

import pytest
import torch

import mas_kernels as mk
from tests import reference as ref
from tests.helpers import BF16, F16, F32, F64, assert_close

OPS = torch.ops.mas_kernels
RTOL = 1e-12

SHAPES = [(5, 3), (7,), (4, 4), (1,), (0, 3)]


def _penalty_lists(p_dtype=F64, o_dtype=F64, g_dtype=None):
    g_dtype = g_dtype or p_dtype
    params = [torch.randn(s, dtype=F64).to(p_dtype) for s in SHAPES]
    anchors = [torch.randn(s, dtype=F64).to(p_dtype) for s in SHAPES]
    omegas = [torch.rand(s, dtype=F64).to(o_dtype) for s in SHAPES]
    grads = [torch.randn(s, dtype=F64).to(g_dtype) for s in SHAPES]
    return params, anchors, omegas, grads


def _value_scale(params, anchors, omegas, lam):
    return abs(lam) * sum((o.to(F64) * (p.to(F64) - a.to(F64)) ** 2).sum() for p, a, o in zip(params, anchors, omegas))


@pytest.mark.parametrize("front", [True, False], ids=["mk", "torch.ops"])
def test_penalty_grad_float64(backend, front):
    params, anchors, omegas, grads = _penalty_lists()
    lam = 0.37
    want_value, want_grads = ref.penalty_and_grads(params, anchors, omegas, lam, grads)
    scales = [g.abs() + 2 * lam * o * (p - a).abs() for p, a, o, g in zip(params, anchors, omegas, grads)]
    call = mk.penalty_grad_ if front else OPS.penalty_grad_
    value = call(params, anchors, omegas, lam, grads)
    assert value.dtype == F64 and value.dim() == 0
    assert_close(value, want_value, _value_scale(params, anchors, omegas, lam), atol=0.0, rtol=RTOL, name="value")
    for i, (g, w, s) in enumerate(zip(grads, want_grads, scales)):
        assert g.dtype == F64
        assert_close(g, w, s, atol=0.0, rtol=RTOL, name=f"grads[{i}]")


def test_penalty_grad_float64_into_dot_grad(backend):
    params = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in SHAPES]
    _, anchors, omegas, _ = _penalty_lists()
    lam = 1.7
    want_value, want_grads = ref.penalty_and_grads([p.detach() for p in params], anchors, omegas, lam,
                                                   [torch.zeros_like(p) for p in params])
    value = mk.penalty_grad_(params, anchors, omegas, lam)
    assert_close(value, want_value, _value_scale(params, anchors, omegas, lam), atol=0.0, rtol=RTOL, name="value")
    for i, (p, w) in enumerate(zip(params, want_grads)):
        assert p.grad.dtype == F64
        assert_close(p.grad, w, atol=0.0, rtol=RTOL, name=f"params[{i}].grad")


@pytest.mark.parametrize("p_dtype,o_dtype,g_dtype", [(F64, F32, F64), (F32, F64, F32), (BF16, F64, BF16),
                                                     (F64, BF16, F16)], ids=str)
def test_penalty_grad_float64_mixed_with_other_dtypes(backend, p_dtype, o_dtype, g_dtype):
    # An entry with a float64 tensor is computed in float64; the value is float64. Only the
    # grads stored in a narrower dtype round (once).
    params, anchors, omegas, grads = _penalty_lists(p_dtype, o_dtype, g_dtype)
    lam = 0.5
    want_value, want_grads = ref.penalty_and_grads(params, anchors, omegas, lam, grads)
    value = mk.penalty_grad_(params, anchors, omegas, lam, grads)
    assert value.dtype == F64
    assert_close(value, want_value, _value_scale(params, anchors, omegas, lam), atol=0.0, rtol=RTOL, name="value")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        if g_dtype == F64:
            assert_close(g, w, atol=0.0, rtol=RTOL, name=f"grads[{i}]")
        else:  # one rounding of the float64 result into the grad's dtype
            assert torch.equal(g, w.to(g_dtype)), f"grads[{i}]"


def test_penalty_float64_differentiable_twice(backend):
    lam = 0.9
    params = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    _, anchors, omegas, _ = _penalty_lists()
    value = mk.penalty(params, anchors, omegas, lam)
    assert value.dtype == F64
    want_value, want_grads = ref.penalty_and_grads([p.detach() for p in params], anchors, omegas, lam,
                                                   [torch.zeros_like(p) for p in params])
    assert_close(value, want_value, _value_scale(params, anchors, omegas, lam), atol=0.0, rtol=RTOL, name="value")
    grads = torch.autograd.grad(3.0 * value, params, create_graph=True)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == F64
        assert_close(g, 3.0 * w, atol=0.0, rtol=RTOL, name=f"grad[{i}]")
    vs = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
    for i, (h, v, o) in enumerate(zip(hvp, vs, omegas)):
        assert_close(h, 3.0 * 2 * lam * o * v, atol=0.0, rtol=RTOL, name=f"hvp[{i}]")


@pytest.mark.parametrize("t_dtype", [F64, F32, BF16])
@pytest.mark.parametrize("front", [True, False], ids=["mk", "torch.ops"])
def test_abs_accumulate_float64_omegas(backend, t_dtype, front):
    omegas = [torch.rand(s, dtype=F64) for s in SHAPES]
    tensors = [torch.randn(s, dtype=F64).to(t_dtype) for s in SHAPES]
    alpha = 0.3
    want = ref.abs_accumulate(omegas, tensors, alpha)
    (mk.abs_accumulate_ if front else OPS.abs_accumulate_)(omegas, tensors, alpha)
    for i, (o, w) in enumerate(zip(omegas, want)):
        assert o.dtype == F64
        assert_close(o, w, atol=0.0, rtol=RTOL, name=f"omegas[{i}]")


def test_abs_accumulate_float64_tensors_into_float32_omegas(backend):
    # float32 omega: |t| rounded to float32, added in float32 (the result is a float32 one).
    omegas = [torch.rand(s) for s in SHAPES]
    tensors = [torch.randn(s, dtype=F64) for s in SHAPES]
    want = [o + 0.25 * t.abs().float() for o, t in zip(omegas, tensors)]
    mk.abs_accumulate_(omegas, tensors, 0.25)
    for i, (o, w) in enumerate(zip(omegas, want)):
        assert o.dtype == F32 and torch.equal(o, w), f"omegas[{i}]"


@pytest.mark.parametrize("dtypes", [(F64, F64), (F64, F32), (BF16, F64), (F16, F16)], ids=str)
@pytest.mark.parametrize("front", [True, False], ids=["mk", "torch.ops"])
def test_abs_outer_float64_omega(backend, dtypes, front):
    a = torch.randn(9, 4, dtype=F64).to(dtypes[0])
    b = torch.randn(6, 9, dtype=F64).to(dtypes[1]).t()  # a transposed view
    omega = torch.rand(4, 6, dtype=F64)
    want = ref.abs_outer(omega, a, b, 0.5)
    scale = omega.abs() + 0.5 * (a.to(F64).abs().T @ b.to(F64).abs())
    (mk.abs_outer_accumulate_ if front else OPS.abs_outer_accumulate_)(omega, a, b, 0.5)
    assert omega.dtype == F64
    assert_close(omega, want, scale, atol=0.0, rtol=RTOL, name="omega")


# T = 1 (the abs-GEMM), T > 1, and a budget that makes every path chunk (samples, tiles, positions).
BMM_CASES = {
    "T=1": ((6, 1, 5, 7), None),
    "T=3": ((5, 3, 4, 6), None),
    "chunked": ((7, 40, 70, 90), 64 << 10),
}


@pytest.mark.parametrize("case", list(BMM_CASES))
@pytest.mark.parametrize("b_dtype", [F64, BF16])
def test_abs_bmm_float64_omega(backend, case, b_dtype):
    (S, T, J, I), budget = BMM_CASES[case]
    a = torch.randn(S, T, J, dtype=F64)
    b = torch.randn(S, I, T, dtype=F64).to(b_dtype).transpose(1, 2)  # a strided view
    omega = torch.rand(J, I, dtype=F64)
    want = ref.abs_bmm(omega, a, b, 0.75)
    scale = omega + 0.75 * torch.einsum("stj,sti->ji", a.abs(), b.to(F64).abs())
    kwargs = {} if budget is None else {"memory_budget": budget}
    mk.abs_bmm_accumulate_(omega, a, b, 0.75, **kwargs)
    assert omega.dtype == F64
    assert_close(omega, want, scale, atol=0.0, rtol=RTOL, name="omega")


def test_abs_bmm_float64_through_torch_ops(backend):
    a, b = torch.randn(4, 3, 5, dtype=F64), torch.randn(4, 3, 6, dtype=F64)
    omega = torch.zeros(5, 6, dtype=F64)
    OPS.abs_bmm_accumulate_(omega, a, b, 1.0, 1 << 20)
    assert_close(omega, ref.abs_bmm(torch.zeros(5, 6), a, b, 1.0), atol=0.0, rtol=RTOL, name="omega")


def test_opcheck_float64(backend):
    # The fake kernels give the value dtype the kernels give (float64 when a tensor is).
    params = [torch.randn(3, 5, dtype=F64), torch.randn(7)]
    anchors = [torch.randn(3, 5, dtype=F64), torch.randn(7)]
    omegas = [torch.rand(3, 5, dtype=F64), torch.rand(7)]
    grads = [torch.zeros(3, 5, dtype=F64), torch.zeros(7)]
    for op, args in [(OPS.penalty_grad_.default, (params, anchors, omegas, 0.3, grads)),
                     (OPS.penalty.default, ([p.requires_grad_() for p in params], anchors, omegas, 0.3)),
                     (OPS.abs_accumulate_.default, (omegas, grads, 0.5))]:
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), results


def test_float64_state_buffers_and_penalty_of_a_float64_model():
    # What the wrapper needs for a float64 model: Omega, theta* and the accumulator in float64,
    # and a penalty (and its gradient) in float64 from them, exact to float64 rounding.
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    mas = mk.MAS(model, importance="global_batch", omega_dtype=F64, lam=0.7)
    assert mas.penalty().dtype == F64  # before the first task: a float64 zero
    mas.estimate([torch.randn(8, 6, dtype=F64)])
    assert all(t.dtype == F64 for t in mas.state_dict()["accumulator"].values())
    mas.consolidate()
    assert all(t.dtype == F64 for t in list(mas.omega.values()) + list(mas.anchors.values()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    named = dict(model.named_parameters())
    want = 0.7 * sum((mas.omega[n] * (named[n].detach() - mas.anchors[n]) ** 2).sum() for n in mas.omega)
    model.zero_grad(set_to_none=True)
    got = mas.add_penalty_grad_()
    assert got.dtype == F64
    assert_close(got, want, atol=0.0, rtol=RTOL, name="penalty")
    for n, p in named.items():
        assert_close(p.grad, 1.4 * mas.omega[n] * (p.detach() - mas.anchors[n]), atol=0.0, rtol=RTOL, name=n)
    assert_close(mas.penalty().detach(), want, atol=0.0, rtol=RTOL, name="penalty()")
