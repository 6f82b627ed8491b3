"""One behaviour on every backend: the calls every kernel refuses before writing, and what the ops support.

Each refusal is checked twice per backend: through the op's Python front door
(``mk.*``) and through ``torch.ops.mas_kernels.*``, which is what ``mk.MAS``
calls with its pre-validated lists (the registered kernels make the same
cheap checks: C++ for native, the op's guard for the Python kernels).
"""

from __future__ import annotations

import math

import pytest
import torch

import mas_kernels as mk
from tests import reference as ref
from tests.helpers import assert_close

OPS = torch.ops.mas_kernels
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _outer(front: bool):
    return mk.abs_outer_accumulate_ if front else OPS.abs_outer_accumulate_


def _acc(front: bool):
    return mk.abs_accumulate_ if front else OPS.abs_accumulate_


def _pen(front: bool):
    return mk.penalty_grad_ if front else OPS.penalty_grad_


FRONT = pytest.mark.parametrize("front", [True, False], ids=["mk", "torch.ops"])


# --------------------------------------------------------------- refused calls
@FRONT
def test_inference_outputs_outside_inference_mode_refused_unwritten(backend, front):
    with torch.inference_mode():
        omega = torch.zeros(3, 4)
        omegas = [torch.zeros(3), torch.zeros(2)]
        grads = [torch.zeros(3), torch.zeros(2)]
    normal = torch.zeros(3)
    with pytest.raises(ValueError, match="omega is an inference tensor"):
        _outer(front)(omega, torch.ones(2, 3), torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"omegas\[0\] is an inference tensor"):
        _acc(front)(omegas, [torch.ones(3), torch.ones(2)], 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] is an inference tensor"):
        _pen(front)([torch.ones(3)] * 2, [torch.zeros(3)] * 2, [torch.ones(3)] * 2, 1.0, [normal, grads[0]])
    assert omega.count_nonzero() == 0 and all(t.count_nonzero() == 0 for t in omegas + grads)
    assert normal.count_nonzero() == 0  # index 0 was not written before index 1 was refused
    with torch.inference_mode():  # inside inference mode the same calls are plain updates
        _outer(front)(omega, torch.ones(2, 3), torch.ones(2, 4), 1.0)
    assert torch.equal(omega, torch.full((3, 4), 2.0))


@FRONT
def test_outputs_sharing_memory_refused_unwritten(backend, front):
    # A stride-0 (expanded) output at list index 1: index 0 must not have been written.
    g0, g1 = torch.zeros(3), torch.zeros(1).expand(3)
    with pytest.raises(ValueError, match=r"grads\[1\] has elements that share memory"):
        _pen(front)([torch.ones(3)] * 2, [torch.zeros(3)] * 2, [torch.ones(3)] * 2, 1.0, [g0, g1])
    o0, o1 = torch.zeros(3), torch.zeros(1).expand(3)
    with pytest.raises(ValueError, match=r"omegas\[1\] has elements that share memory"):
        _acc(front)([o0, o1], [torch.ones(3)] * 2, 1.0)
    omega = torch.zeros(1, 1).expand(3, 4)
    with pytest.raises(ValueError, match="omega has elements that share memory"):
        _outer(front)(omega, torch.ones(2, 3), torch.ones(2, 4), 1.0)
    assert g0.count_nonzero() == 0 and o0.count_nonzero() == 0 and omega.count_nonzero() == 0


@FRONT
def test_abs_outer_output_aliasing_an_input_refused(backend, front):
    x = torch.randn(4, 4)
    for a, b, name in [("omega", x, "a"), (x, "omega", "b"), ("omega.T", x, "a")]:
        omega = torch.randn(4, 4)
        before = omega.clone()
        args = {"omega": omega, "omega.T": omega.t()}
        with pytest.raises(ValueError, match="shares memory with"):
            _outer(front)(omega, args.get(a, a) if isinstance(a, str) else a,
                          args.get(b, b) if isinstance(b, str) else b, 1.0)
        assert torch.equal(omega, before), name
    # A row slice of a bigger buffer next to omega's rows does not overlap: accepted.
    buf = torch.zeros(8, 4)
    omega, a = buf[:4], torch.ones(2, 4)
    _outer(front)(omega, a, buf[4:6] + 1.0, 1.0)
    assert torch.equal(omega, torch.full((4, 4), 2.0))


@FRONT
@pytest.mark.parametrize("value", [1e39, -1e39, math.inf, -math.inf, math.nan])
def test_non_finite_or_float32_overflowing_scalars_refused(backend, front, value):
    omega, omegas, grads = torch.zeros(3, 4), [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(ValueError, match="alpha"):
        _outer(front)(omega, torch.ones(2, 3), torch.ones(2, 4), value)
    with pytest.raises(ValueError, match="alpha"):
        _acc(front)(omegas, [torch.ones(3)], value)
    with pytest.raises(ValueError, match="lam"):
        _pen(front)([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], value, grads)
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="lam"):
        (mk.penalty if front else lambda *a: OPS.penalty(*a)[0])([p], [torch.zeros(3)], [torch.ones(3)], value)
    assert omega.count_nonzero() == 0 and omegas[0].count_nonzero() == 0 and grads[0].count_nonzero() == 0


def test_lam_whose_gradient_scale_overflows_refused(backend):
    # 2e38 fits float32, but the gradient scale 2 * lam does not.
    grads = [torch.zeros(3)]
    with pytest.raises(ValueError, match="lam=2e\\+38"):
        mk.penalty_grad_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], 2e38, grads)
    assert grads[0].count_nonzero() == 0
    value = mk.penalty_grad_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], 1e38, grads)
    assert math.isfinite(value.item()) and torch.isfinite(grads[0]).all()


# ------------------------------------------------------------- what they support
def test_same_parameter_twice_without_grad_gets_both_contributions(backend):
    # A tied weight listed once per module that uses it.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    zero, one = torch.zeros(3), torch.ones(3)
    value = mk.penalty_grad_([p, p], [zero, zero], [one, one], 1.0)
    assert value.item() == 28.0
    assert p.grad.tolist() == [4.0, 8.0, 12.0]
    # With a .grad already there: added into it twice as well.
    value = mk.penalty_grad_([p, p], [zero, zero], [one, one], 1.0)
    assert p.grad.tolist() == [8.0, 16.0, 24.0]


@pytest.mark.parametrize("omega_dtype", [BF16, F16])
def test_penalty_with_16_bit_omega(backend, omega_dtype):
    shapes = [(5, 3), (7,), (4, 4)]
    params = [torch.randn(s, dtype=d) for s, d in zip(shapes, (F32, BF16, F16))]
    anchors = [torch.randn(s) for s in shapes]
    omegas = [torch.rand(s).to(omega_dtype) for s in shapes]
    grads = [torch.zeros(s) for s in shapes]
    want_value, want_grads = ref.penalty_and_grads(params, anchors, omegas, 0.5, grads)
    value = mk.penalty_grad_(params, anchors, omegas, 0.5, grads)
    assert_close(value, want_value, dtype=F32, name="value")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(g, w, dtype=F32, name=f"grads[{i}]")


def test_penalty_double_backward_gives_the_hessian_vector_product(backend):
    # H = 2 lam diag(Omega): a second backward through the gradient gives 2 lam Omega v.
    lam = 0.7
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, dtype=BF16, requires_grad=True)]
    anchors = [torch.randn(4, 3), torch.randn(5)]
    omegas = [torch.rand(4, 3), torch.rand(5)]
    vs = [torch.randn(4, 3), torch.randn(5)]
    value = mk.penalty(params, anchors, omegas, lam)
    grads = torch.autograd.grad(3.0 * value, params, create_graph=True)
    for g, p, a, o in zip(grads, params, anchors, omegas):
        want = 3.0 * 2 * lam * o.double() * (p.detach().double() - a.double())
        assert_close(g, want, dtype=p.dtype, name="first derivative")
    hvp = torch.autograd.grad(sum((g.float() * v).sum() for g, v in zip(grads, vs)), params)
    for h, v, o in zip(hvp, vs, omegas):
        want = 3.0 * 2 * lam * o.double() * v.double()
        assert_close(h, want, dtype=h.dtype, name="Hessian-vector product")
