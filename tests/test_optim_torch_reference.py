"""The fused step ops against ``torch.optim`` itself, with the penalty gradient written out literally.

An independent reference next to ``tests/reference.py``'s formulas: ``torch.optim.AdamW`` / ``Adam`` /
``SGD`` (single-tensor path) over float64 copies, each parameter's ``.grad`` set to
``grad + 2 lam Omega (theta - theta*)``. Hypothesis draws the tensor lists across the native kernel's
seams: pieces of a tensor in two 32K-element work chunks, the 1024-element sum blocks, the 16-element
prefetch lines and their remainders, misaligned starts, 16-bit storage. Every step starts the
reference from the state the op left (copied in float64), so each step is checked on its own, to one
rounding of the stored dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import BF16, F16, F32, F64, HYPOTHESIS, assert_close, out_tol

OPS = torch.ops.mas_kernels
LAM = 0.3

# Sizes at the native kernel's seams (16-element lines, 1024-element sum blocks, 32K-element chunks).
_size = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 1023, 1025, 32767, 32769]), st.integers(0, 40000))


def _make(sizes, dtype, offset, fill=torch.randn, scale=1.0):
    """Tensors of ``sizes`` in ``dtype``; ``offset`` elements into a larger buffer (a misaligned start)."""
    return [(scale * fill(n + offset, dtype=F32)).to(dtype)[offset:] for n in sizes]


def _penalty_grads(params, grads, anchors, omegas):
    """``grad + 2 lam Omega (theta - theta*)`` in float64, literally (the gradient ``add_penalty_grad_`` gives)."""
    if not anchors:
        return [g.to(F64) for g in grads]
    return [g.to(F64) + 2.0 * LAM * o.to(F64) * (p.to(F64) - a.to(F64))
            for p, g, a, o in zip(params, grads, anchors, omegas)]


def _g_rounding(params, grads, anchors, omegas, coupled_decay: float = 0.0):
    """How far float32 arithmetic may put the penalized gradient ``g`` from its float64 value: a few roundings
    of its terms' magnitudes. Adam divides by about ``|g|`` on its first steps, so where the terms nearly
    cancel this, not the update's own rounding, is the update's error (``lr * delta_g / denominator``)."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        size = g.to(F64).abs() + coupled_decay * p.to(F64).abs()
        if anchors:
            size = size + (2.0 * LAM * omegas[i].to(F64) * (p.to(F64) - anchors[i].to(F64))).abs()
        out.append(2.0 ** -21 * size)
    return out


def _penalty_value(params, anchors, omegas):
    total = sum(float((o.to(F64) * (p.to(F64) - a.to(F64)) ** 2).sum()) for p, a, o in zip(params, anchors, omegas))
    return torch.tensor(LAM * total, dtype=F64)


def _reference(kind, params64, **hp):
    if kind == "SGD":
        return torch.optim.SGD(params64, foreach=False, **hp)
    return getattr(torch.optim, kind)(params64, foreach=False, **hp)


ADAM_KINDS = {
    "AdamW": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    "Adam": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),  # coupled (L2)
    "Adam amsgrad maximize": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=True,
                                  maximize=True),
}


@pytest.mark.filterwarnings("ignore:mas_kernels. the Triton optimizer-step kernels read float32 Omega")
@settings(max_examples=20, **HYPOTHESIS)
@given(sizes=st.lists(_size, min_size=1, max_size=3), dtype=st.sampled_from([F32, BF16, F16]),
       state_dtype=st.sampled_from([F32, BF16]), kind=st.sampled_from(list(ADAM_KINDS)), penalty=st.booleans(),
       offset=st.sampled_from([0, 1, 3]))
def test_adam_op_matches_torch_optim(backend, sizes, dtype, state_dtype, kind, penalty, offset):
    hp = ADAM_KINDS[kind]
    amsgrad, maximize = hp.get("amsgrad", False), hp.get("maximize", False)
    decoupled = kind == "AdamW"
    params = _make(sizes, dtype, offset)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else []
    steps = [torch.tensor(0.0) for _ in params]
    anchors = [(p.float() + 0.1 * torch.randn(p.shape)).to(state_dtype) for p in params] if penalty else []
    omegas = _make(sizes, state_dtype, 0, torch.rand) if penalty else []
    ref_params = [torch.nn.Parameter(p.to(F64)) for p in params]
    ref_opt = _reference("AdamW" if decoupled else "Adam", ref_params, **hp)
    for step in range(3):
        grads = _make(sizes, dtype, offset)
        for q, g in zip(ref_params, _penalty_grads(params, grads, anchors, omegas)):
            q.grad = g
        want_value = _penalty_value(params, anchors, omegas) if penalty else torch.zeros((), dtype=F64)
        before = [p.to(F64) for p in params]
        rounding = _g_rounding(params, grads, anchors, omegas, 0.0 if decoupled else hp["weight_decay"])
        value = OPS.adam_penalty_step_(params, grads, m, v, vmax, steps, anchors, omegas, LAM if penalty else 0.0,
                                       hp["lr"], hp["betas"][0], hp["betas"][1], hp["eps"], hp["weight_decay"],
                                       decoupled, maximize)
        ref_opt.step()
        for i, q in enumerate(ref_params):
            st_ = ref_opt.state[q]
            assert steps[i].item() == float(st_["step"]) == step + 1
            # theta moves by at most ~lr per step: the update's own rounding is relative to lr, not theta; plus
            # the float32 rounding of g through the update (see _g_rounding; 4x: the m and v paths, bias
            # corrections), which matters only where |g| is near eps.
            b1, b2 = hp["betas"]
            denom = (st_["max_exp_avg_sq" if amsgrad else "exp_avg_sq"] / (1 - b2 ** (step + 1))).sqrt() + hp["eps"]
            through_g = 4.0 * hp["lr"] * rounding[i] / denom
            atol, _ = out_tol(params[i].dtype)
            assert_close(params[i], q.detach(), scale=before[i].abs() + hp["lr"] * 20, atol=atol + through_g,
                         name=f"step {step} params[{i}]")
            g_abs = q.grad.abs()
            m_atol, v_atol = out_tol(m[i].dtype)[0], out_tol(v[i].dtype)[0]
            assert_close(m[i], st_["exp_avg"], atol=m_atol + (1 - b1) * rounding[i], name=f"step {step} exp_avgs[{i}]")
            assert_close(v[i], st_["exp_avg_sq"], atol=v_atol + 2 * (1 - b2) * g_abs * rounding[i],
                         name=f"step {step} exp_avg_sqs[{i}]")
            if amsgrad:
                assert_close(vmax[i], st_["max_exp_avg_sq"], name=f"step {step} max_exp_avg_sqs[{i}]")
            # The next step starts both from what the op stored.
            with torch.no_grad():
                q.copy_(params[i])
                st_["exp_avg"].copy_(m[i])
                st_["exp_avg_sq"].copy_(v[i])
                if amsgrad:
                    st_["max_exp_avg_sq"].copy_(vmax[i])
        assert_close(value, want_value, dtype=F32, name=f"step {step} value")


@settings(max_examples=15, **HYPOTHESIS)
@given(sizes=st.lists(_size, min_size=1, max_size=3), dtype=st.sampled_from([F32, BF16, F16]),
       momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(), penalty=st.booleans(),
       offset=st.sampled_from([0, 1]))
def test_sgd_op_matches_torch_optim(backend, sizes, dtype, momentum, nesterov, penalty, offset):
    nesterov = nesterov and momentum != 0
    hp = dict(lr=5e-2, momentum=momentum, dampening=0.0 if nesterov else 0.1, weight_decay=0.01, nesterov=nesterov)
    params = _make(sizes, dtype, offset)
    bufs = [torch.empty_like(p) for p in params] if momentum else []
    anchors = [p.float() + 0.1 * torch.randn(p.shape) for p in params] if penalty else []
    omegas = _make(sizes, F32, 0, torch.rand) if penalty else []
    ref_params = [torch.nn.Parameter(p.to(F64)) for p in params]
    ref_opt = _reference("SGD", ref_params, **hp)
    for step in range(3):
        grads = _make(sizes, dtype, offset)
        for q, g in zip(ref_params, _penalty_grads(params, grads, anchors, omegas)):
            q.grad = g
        want_value = _penalty_value(params, anchors, omegas) if penalty else torch.zeros((), dtype=F64)
        before = [p.to(F64) for p in params]
        value = OPS.sgd_penalty_step_(params, grads, bufs, anchors, omegas, LAM if penalty else 0.0, hp["lr"],
                                      hp["weight_decay"], momentum, hp["dampening"], nesterov, False, step == 0)
        ref_opt.step()
        for i, q in enumerate(ref_params):
            assert_close(params[i], q.detach(), scale=before[i].abs() + 1.0, name=f"step {step} params[{i}]")
            with torch.no_grad():
                q.copy_(params[i])
                if momentum:
                    buf = ref_opt.state[q]["momentum_buffer"]
                    assert_close(bufs[i], buf, name=f"step {step} momentum_buffers[{i}]")
                    buf.copy_(bufs[i])
        assert_close(value, want_value, dtype=F32, name=f"step {step} value")


@pytest.mark.parametrize("penalty", [True, False])
def test_adam_op_many_tensors_one_call(backend, penalty):
    """51 tensors of a ResNet-like spread of sizes in one call (chunks of many small tensors, a tensor
    across three chunks, empty ones), fp32, three steps."""
    g = torch.Generator().manual_seed(3)
    sizes = [int(x) for x in torch.randint(0, 3000, (40,), generator=g)] + [64, 1, 65536, 40000, 7] + [0] * 6
    params = _make(sizes, F32, 1)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    anchors = [p + 0.1 * torch.randn(p.shape) for p in params] if penalty else []
    omegas = _make(sizes, F32, 0, torch.rand) if penalty else []
    ref_params = [torch.nn.Parameter(p.to(F64)) for p in params]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        grads = _make(sizes, F32, 0)
        for q, gr in zip(ref_params, _penalty_grads(params, grads, anchors, omegas)):
            q.grad = gr
        want_value = _penalty_value(params, anchors, omegas) if penalty else torch.zeros((), dtype=F64)
        before = [p.to(F64) for p in params]
        value = OPS.adam_penalty_step_(params, grads, m, v, [], steps, anchors, omegas, LAM if penalty else 0.0,
                                       1e-2, 0.9, 0.999, 1e-8, 0.1, True, False)
        ref_opt.step()
        for i, q in enumerate(ref_params):
            st_ = ref_opt.state[q]
            assert_close(params[i], q.detach(), scale=before[i].abs() + 0.2, name=f"step {step} params[{i}]")
            assert_close(m[i], st_["exp_avg"], name=f"step {step} exp_avgs[{i}]")
            assert_close(v[i], st_["exp_avg_sq"], name=f"step {step} exp_avg_sqs[{i}]")
            with torch.no_grad():
                q.copy_(params[i])
                st_["exp_avg"].copy_(m[i])
                st_["exp_avg_sq"].copy_(v[i])
        assert_close(value, want_value, dtype=F32, name=f"step {step} value")
