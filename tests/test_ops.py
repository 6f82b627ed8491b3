"""The four public ops against ``tests/reference.py``, on both paths.

Every test takes the ``backend`` fixture: once with the PyTorch path and once
with the Triton kernels (under the interpreter on a machine without a GPU).
The reference is computed in float64 from the *same* low-precision inputs, so
the only differences allowed are float32 accumulation and, for outputs stored
in fp16/bf16 (gradients), one rounding to that dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mas_kernels as mk
from tests.helpers import (
    BF16, DTYPES, F16, F32, F64, HYPOTHESIS, LAYOUTS, assert_close, check_abs_accumulate, check_abs_outer,
    check_penalty_grad, expected_penalty, make, out_tol, penalty_inputs,
)


# ------------------------------------------------------- abs_outer_accumulate_
@pytest.mark.parametrize("N, J, I", [(1, 1, 1), (7, 13, 5), (33, 64, 65), (300, 130, 70), (65, 1, 129)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_outer_matches_reference(backend, device, N, J, I, dtype):
    a = make((N, J), dtype, device=device)
    b = make((N, I), dtype, device=device)
    omega = make((J, I), fill="rand", device=device)
    check_abs_outer(omega, a, b, 0.5)


@pytest.mark.parametrize("alpha", [1.0, 1 / 3, 2.5, 0.0])  # alpha < 0: tests/test_ops_guard.py
def test_abs_outer_alpha(backend, alpha):
    a, b, omega = make((9, 6)), make((9, 4)), make((6, 4), fill="rand")
    check_abs_outer(omega, a, b, alpha)


def test_abs_outer_is_not_transposed(backend):
    # Square, so a kernel that computed |b|^T |a| (or read a's strides swapped)
    # would still produce a (J, I) result, just the wrong one.
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    b = torch.tensor([[5.0, 7.0], [-11.0, 13.0]])
    omega = torch.zeros(2, 2)
    mk.abs_outer_accumulate_(omega, a, b)
    assert omega.tolist() == [[5.0, 7.0], [10.0 + 33.0, 14.0 + 39.0]]


@pytest.mark.parametrize("la", LAYOUTS)
@pytest.mark.parametrize("lb", LAYOUTS)
def test_abs_outer_strided_inputs(backend, la, lb):
    a = make((37, 21), F16, la)
    b = make((37, 66), BF16, lb)
    omega = make((21, 66), fill="rand", layout="transposed")
    check_abs_outer(omega, a, b, 0.75)


_dim = st.one_of(st.sampled_from([0, 1, 2, 31, 32, 33, 64, 65]), st.integers(0, 140))


@settings(max_examples=60, **HYPOTHESIS)
@given(
    N=_dim, J=_dim, I=_dim,
    dta=st.sampled_from(DTYPES), dtb=st.sampled_from(DTYPES),
    la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), lo=st.sampled_from(LAYOUTS),
    alpha=st.sampled_from([1.0, 0.25, 1 / 7, 1.5]),
)
def test_abs_outer_hypothesis(backend, N, J, I, dta, dtb, la, lb, lo, alpha):
    a = make((N, J), dta, la)
    b = make((N, I), dtb, lb)
    omega = make((J, I), F32, lo, fill="rand")
    check_abs_outer(omega, a, b, alpha)


def test_abs_outer_empty(backend):
    omega = torch.rand(3, 4)
    before = omega.clone()
    mk.abs_outer_accumulate_(omega, torch.randn(0, 3), torch.randn(0, 4, dtype=BF16))  # no samples
    assert torch.equal(omega, before)
    for J, I in [(0, 4), (3, 0), (0, 0)]:
        empty = torch.zeros(J, I)
        assert mk.abs_outer_accumulate_(empty, torch.randn(5, J), torch.randn(5, I)) is empty


# ------------------------------------------------------------- abs_accumulate_
@pytest.mark.parametrize("shapes", [[(1,)], [(5, 7)], [(3,), (0,), (2, 3, 4), (), (4099,)]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_accumulate_matches_reference(backend, device, shapes, dtype):
    omegas = [make(s, fill="rand", device=device) for s in shapes]
    tensors = [make(s, dtype, device=device) for s in shapes]
    check_abs_accumulate(omegas, tensors, 0.3)


@pytest.mark.parametrize("alpha", [1.0, 1 / 3, 2.0, 0.0])
def test_abs_accumulate_alpha(backend, alpha):
    omegas = [make((4, 5), fill="rand"), make((7,), fill="rand")]
    tensors = [make((4, 5), BF16), make((7,), F16)]
    check_abs_accumulate(omegas, tensors, alpha)


def test_abs_accumulate_many_tensors_and_dtype_groups(backend):
    # 50 tensors of varied sizes (empty ones included) and three input dtypes in one call.
    gen = torch.Generator().manual_seed(1)
    sizes = [int(s) for s in torch.randint(0, 3000, (50,), generator=gen)]
    sizes[3] = sizes[17] = 0
    sizes[4] = 2048  # exactly one block
    sizes[5] = 2049
    shapes = [(s,) if i % 3 else (1, s) for i, s in enumerate(sizes)]
    omegas = [make(s, fill="rand", layout="step2" if i % 7 == 0 else "contiguous") for i, s in enumerate(shapes)]
    tensors = [make(s, DTYPES[i % 3], LAYOUTS[i % 4]) for i, s in enumerate(shapes)]
    check_abs_accumulate(omegas, tensors, 0.5)


def test_abs_accumulate_empty(backend):
    assert mk.abs_accumulate_([], []) == []
    assert mk.abs_accumulate_((), ()) == []
    omegas = [torch.zeros(0), torch.zeros(3, 0)]
    mk.abs_accumulate_(omegas, [torch.zeros(0, dtype=F16), torch.zeros(3, 0)])
    assert [o.shape for o in omegas] == [(0,), (3, 0)]


_shape = st.lists(st.one_of(st.integers(0, 40), st.sampled_from([0, 1, 2047, 2049])), min_size=0, max_size=3).filter(
    lambda s: math.prod(s) <= 5000
)


@settings(max_examples=60, **HYPOTHESIS)
@given(
    specs=st.lists(
        st.tuples(_shape, st.sampled_from(DTYPES), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
        min_size=1, max_size=8,
    ),
    alpha=st.sampled_from([1.0, 0.5, 1 / 3]),
)
def test_abs_accumulate_hypothesis(backend, specs, alpha):
    omegas = [make(s, F32, lo, fill="rand") for s, _, _, lo in specs]
    tensors = [make(s, dt, lt) for s, dt, lt, _ in specs]
    check_abs_accumulate(omegas, tensors, alpha)


# ---------------------------------------------------------------- penalty_grad_
@pytest.mark.parametrize("shapes", [[(1,)], [(5, 7)], [(3,), (0,), (2, 3, 4), (), (4099,)], [(130, 70)]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_grad_matches_reference(backend, device, shapes, dtype):
    params, anchors, omegas, grads = penalty_inputs(shapes, dtype, device=device)
    out = check_penalty_grad(params, anchors, omegas, 0.7, grads)
    assert out.device == params[0].device


@pytest.mark.parametrize("lam", [1.0, 1 / 3, 0.0, -2.0])
def test_penalty_grad_lam(backend, lam):
    params, anchors, omegas, grads = penalty_inputs([(6, 5), (11,)], F32)
    check_penalty_grad(params, anchors, omegas, lam, grads)


@pytest.mark.parametrize(
    "p_dtype, a_dtype, g_dtype",
    [(BF16, F32, F16), (F16, BF16, F32), (F32, F16, BF16), (BF16, BF16, F32)],
)
def test_penalty_grad_mixed_dtypes(backend, p_dtype, a_dtype, g_dtype):
    params, anchors, omegas, grads = penalty_inputs([(17, 3), (2049,)], p_dtype, a_dtype, g_dtype)
    check_penalty_grad(params, anchors, omegas, 0.5, grads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_penalty_grad_strided(backend, layout):
    # Non-contiguous params and grads (the grads must be written back through their strides).
    params, anchors, omegas, grads = penalty_inputs([(9, 14), (3, 5, 8)], F32, BF16, F32, layout=layout,
                                                    anchor_layout=layout, omega_layout=layout)
    check_penalty_grad(params, anchors, omegas, 0.25, grads)


def test_penalty_grad_many_tensors_and_dtype_groups(backend):
    gen = torch.Generator().manual_seed(2)
    sizes = [int(s) for s in torch.randint(0, 3000, (50,), generator=gen)]
    sizes[0] = sizes[25] = sizes[49] = 0
    sizes[7] = 2048
    sizes[8] = 1
    shapes = [(s,) if i % 2 else (s, 1) for i, s in enumerate(sizes)]
    params = [make(s, DTYPES[i % 3]) for i, s in enumerate(shapes)]
    anchors = [make(s, DTYPES[(i // 3) % 3]) for i, s in enumerate(shapes)]
    omegas = [make(s, fill="rand") for s in shapes]
    grads = [make(s, DTYPES[(i // 9) % 3], LAYOUTS[i % 4]) for i, s in enumerate(shapes)]
    check_penalty_grad(params, anchors, omegas, 0.125, grads)


def test_penalty_grad_into_dot_grad(backend):
    # grads=None: p.grad is allocated as zeros where None, accumulated where it exists.
    params, anchors, omegas, _ = penalty_inputs([(4, 3), (5,), (0,), (2, 2)], F32)
    params[1] = params[1].to(BF16)
    anchors[1] = anchors[1].to(BF16)
    params = [p.requires_grad_() for p in params]
    params[0].grad = torch.randn(4, 3)
    params[3].grad = make((2, 2), layout="transposed")
    existing = [params[0].grad, params[3].grad]
    before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    value, new_grads, scales = expected_penalty(params, anchors, omegas, 0.5, before)

    out = mk.penalty_grad_(params, anchors, omegas, 0.5)

    assert out.dim() == 0 and out.dtype == F32
    assert_close(out, value, dtype=F32, name="value")
    assert params[0].grad is existing[0] and params[3].grad is existing[1]  # in place
    for i, p in enumerate(params):
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape
        assert_close(p.grad, new_grads[i], scales[i], name=f"params[{i}].grad")
    assert not any(p.grad.requires_grad for p in params)

    # A second call adds again.
    mk.penalty_grad_(params, anchors, omegas, 0.5)
    for i, p in enumerate(params):
        twice = new_grads[i] + (new_grads[i] - before[i].to(F64))
        assert_close(p.grad, twice, 2 * scales[i], name=f"params[{i}].grad (second call)")


def test_penalty_grad_value_is_not_differentiable(backend):
    # Anchors cloned from the parameters without detach(), omegas that require
    # grad: the returned value is a number to log or add to a detached loss, and
    # adding it to a live loss must not break that loss's backward.
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    anchors = [p.clone() + 0.5 for p in params]
    omegas = [torch.rand_like(p).requires_grad_() for p in params]
    value = mk.penalty_grad_(params, anchors, omegas, 1.0)
    assert not value.requires_grad
    (model(torch.randn(4, 3)).sum() + value).backward()
    assert all(o.grad is None for o in omegas)


def test_penalty_grad_empty(backend):
    out = mk.penalty_grad_([], [], [], 1.0)
    assert out.dim() == 0 and out.dtype == F32 and out.item() == 0.0
    out = mk.penalty_grad_([], [], [], 1.0, [])
    assert out.item() == 0.0
    p = torch.zeros(0, 3, requires_grad=True)
    out = mk.penalty_grad_([p], [torch.zeros(0, 3)], [torch.zeros(0, 3)], 2.0)
    assert out.dim() == 0 and out.dtype == F32 and out.item() == 0.0
    assert p.grad is not None and p.grad.shape == (0, 3)


@settings(max_examples=60, **HYPOTHESIS)
@given(
    specs=st.lists(
        st.tuples(
            _shape, st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.sampled_from(DTYPES),
            st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS),
        ),
        min_size=1, max_size=8,
    ),
    lam=st.sampled_from([1.0, 0.5, 1 / 3, 2.0]),
)
def test_penalty_grad_hypothesis(backend, specs, lam):
    params = [make(s, pd, lp) for s, pd, _, _, lp, _ in specs]
    anchors = [make(s, ad) for s, _, ad, _, _, _ in specs]
    omegas = [make(s, F32, lg, fill="rand") for s, _, _, _, _, lg in specs]
    grads = [make(s, gd, lg) for s, _, _, gd, _, lg in specs]
    check_penalty_grad(params, anchors, omegas, lam, grads)


# --------------------------------------------------------------------- penalty
def plain_penalty(params, anchors, omegas, lam):
    return lam * sum((o * (p - a.to(p.dtype)) ** 2).sum() for p, a, o in zip(params, anchors, omegas))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_matches_reference(backend, device, dtype, layout):
    shapes = [(6, 5), (0,), (), (2049,), (3, 70)]
    params, anchors, omegas, _ = penalty_inputs(shapes, dtype, F32, layout=layout, device=device)
    params = [p.requires_grad_() for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    value, new_grads, scales = expected_penalty(params, anchors, omegas, 0.3, zeros)

    out = mk.penalty(params, anchors, omegas, 0.3)
    assert out.dim() == 0 and out.dtype == F32 and out.requires_grad
    assert_close(out, value, dtype=F32, name="value")
    out.backward()
    for i, p in enumerate(params):
        assert p.grad.dtype == dtype
        assert_close(p.grad, new_grads[i], scales[i], name=f"params[{i}].grad")


def test_penalty_matches_autograd(backend):
    # A model's loss plus the penalty, against the same loss plus the penalty
    # written in plain PyTorch: value and every gradient.
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    params = list(model.parameters())
    anchors = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    omegas = [torch.rand_like(p) for p in params]
    x, y = torch.randn(5, 7), torch.randint(0, 3, (5,))

    loss = torch.nn.functional.cross_entropy(model(x), y) + plain_penalty(params, anchors, omegas, 2.5)
    want = torch.autograd.grad(loss, params)
    loss_ours = torch.nn.functional.cross_entropy(model(x), y) + mk.penalty(params, anchors, omegas, 2.5)
    got = torch.autograd.grad(loss_ours, params)

    torch.testing.assert_close(loss_ours, loss, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [3.0, -0.5, 1 / 3])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_penalty_gradient_scales_with_loss(backend, scale, dtype):
    params, anchors, omegas, _ = penalty_inputs([(8, 3), (5,)], dtype, F32)
    params = [p.requires_grad_() for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    _, new_grads, scales = expected_penalty(params, anchors, omegas, 0.5, zeros)

    (scale * mk.penalty(params, anchors, omegas, 0.5)).backward()

    # In low precision the fused pass rounds the gradient to p's dtype and the
    # backward's scaling rounds it again (and may round the scale): three roundings.
    atol, rtol = out_tol(dtype)
    rtol = rtol if dtype == F32 else 3 * rtol
    for i, p in enumerate(params):
        assert_close(p.grad, scale * new_grads[i], abs(scale) * scales[i], atol=atol, rtol=rtol, name=f"params[{i}].grad")


def test_penalty_backward_twice_with_retained_graph(backend):
    # The backward scales a copy of the saved gradient: a second backward sees it unchanged.
    params, anchors, omegas, _ = penalty_inputs([(6, 2), (3,)], F32)
    params = [p.requires_grad_() for p in params]
    _, new_grads, scales = expected_penalty(params, anchors, omegas, 0.5, [torch.zeros_like(p) for p in params])
    value = mk.penalty(params, anchors, omegas, 0.5)
    (2.0 * value).backward(retain_graph=True)
    value.backward()
    for i, p in enumerate(params):
        assert_close(p.grad, 3.0 * new_grads[i], 3.0 * scales[i], name=f"params[{i}].grad")


def test_penalty_accumulates_and_leaves_anchors_alone(backend):
    params, anchors, omegas, _ = penalty_inputs([(4, 4), (3,)], F32)
    params = [p.requires_grad_() for p in params]
    anchors = [a.requires_grad_() for a in anchors]
    for p in params:
        p.grad = torch.ones_like(p)
    zeros = [torch.zeros_like(p) for p in params]
    _, new_grads, scales = expected_penalty(params, anchors, omegas, 1.5, zeros)

    mk.penalty(params, anchors, omegas, 1.5).backward()

    for i, p in enumerate(params):
        assert_close(p.grad, 1.0 + new_grads[i], 1.0 + scales[i], name=f"params[{i}].grad")
    assert all(a.grad is None for a in anchors)
    assert all(o.grad is None for o in omegas)


def test_penalty_empty(backend):
    out = mk.penalty([], [], [], 1.0)
    assert out.dim() == 0 and out.dtype == F32 and out.item() == 0.0


# ------------------------------------------------------- the interpreter bf16 trap
# Values whose bf16 arithmetic differs from fp32: a kernel that did its math in
# bf16 (or, under the interpreter, without the cast to fp32 after the load, where
# bf16 arithmetic is simply wrong) fails these; exact fp32 math passes exactly.
def test_bf16_trap_penalty_grad(backend):
    p = torch.tensor([258.0, -3.0, 1.0 + 2**-7], dtype=BF16)
    a = torch.tensor([1.0, 2.0**-9, -(1.0 + 2**-7)], dtype=BF16)  # p - a: 257, -(3 + 2**-9), 2 + 2**-6
    assert (p.float() - a.float()).tolist() != (p - a).float().tolist()  # the trap is real
    omega = torch.tensor([1.0, 3.0, 0.5])
    grads = [torch.zeros(3)]
    out = mk.penalty_grad_([p], [a], [omega], 1.0, grads)
    d = torch.tensor([257.0, -(3.0 + 2**-9), 2.0 + 2**-6], dtype=F64)
    assert out.item() == pytest.approx((omega.double() * d * d).sum().item(), rel=1e-7)
    assert grads[0].double().tolist() == (2 * omega.double() * d).tolist()


def test_bf16_trap_abs_outer(backend):
    # Each product (1 + 2**-7)**2 = 1 + 2**-6 + 2**-14 needs 15 bits; their sum
    # over 40 samples is exact in fp32 but not in bf16.
    x = 1.0 + 2**-7
    a = torch.full((40, 3), -x, dtype=BF16)
    b = torch.full((40, 2), x, dtype=BF16)
    b[::2] = -b[::2]
    omega = torch.zeros(3, 2)
    mk.abs_outer_accumulate_(omega, a, b)
    assert omega.double().unique().tolist() == [40 * x * x]


def test_bf16_trap_abs_accumulate(backend):
    t = torch.tensor([-(1.0 + 2**-7), 3.0, -2.0**-20], dtype=BF16)
    omega = torch.tensor([0.0, 1.0, 0.0])
    mk.abs_accumulate_([omega], [t], 1 / 3)
    want = torch.tensor([0.0, 1.0, 0.0], dtype=F64) + t.double().abs() * torch.tensor(1 / 3, dtype=F32).double()
    assert_close(omega, want, atol=0.0, rtol=2e-7)


@pytest.mark.parametrize("contiguous", [True, False])
def test_repeated_outputs_update_once_per_appearance(backend, contiguous):
    """A tensor listed twice as an output gets both updates, on every path (no race, no lost copy-back)."""
    base = torch.zeros(6, 5)
    o = base if contiguous else base.t()
    t1, t2 = torch.randn_like(o), torch.randn_like(o)
    mk.abs_accumulate_([o, o], [t1, t2], 1.0)
    torch.testing.assert_close(o, t1.abs() + t2.abs())

    g = torch.zeros(6, 5) if contiguous else torch.zeros(5, 6).t()
    p, a, om = torch.randn(6, 5), torch.randn(6, 5), torch.rand(6, 5)
    value = mk.penalty_grad_([p, p], [a, a], [om, om], 0.5, [g, g])
    torch.testing.assert_close(g, 2 * (2 * 0.5 * om * (p - a)))
    torch.testing.assert_close(value, 2 * 0.5 * (om * (p - a) ** 2).sum())


def test_explicit_grads_entry_none_rejected():
    p = [torch.randn(3), torch.randn(2)]
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        mk.penalty_grad_(p, [x.clone() for x in p], [torch.ones(3), torch.ones(2)], 1.0, [torch.zeros(3), None])
