"""One guard for every op, on every backend and every entry point (issue 21, items 1-4).

Each attack is made on every backend (the ``backend`` fixture: the PyTorch
path, Triton under its interpreter, the native C++ kernels) through the op's
Python front door (``mk.*``) and through ``torch.ops.mas_kernels.*``, which is
what a user, ``torch.compile`` or ``mk.MAS`` reaches. Every one must be a
``ValueError`` naming the op and the argument, with nothing written; the
calls the ops support (a tensor listed twice, an output that is its own
entry's input, views whose byte ranges interleave without a common element)
must give the formula's result. Expected values come from
``tests/reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import mas_kernels as mk
from mas_kernels import _backend, _native
from mas_kernels.ops import _checks, _library
from mas_kernels.ops import abs_bmm as abs_bmm_module
from tests import reference as ref
from tests.helpers import assert_close

OPS = torch.ops.mas_kernels

FRONT = pytest.mark.parametrize("front", [True, False], ids=["mk", "torch.ops"])


@pytest.fixture(autouse=True, params=["python"] + (["C++"] if _native.built() else []))
def guard_code(request, monkeypatch):
    """Every test twice: the Python kernels' guard and the front doors' address checks in Python, and in
    their C++ copy (csrc/guard.cpp, what they call where the extension is built). The native kernels
    run the C++ guard in both."""
    monkeypatch.setattr(_checks, "USE_NATIVE", request.param == "C++", raising=False)
    return request.param


def _pen(front):
    return mk.penalty_grad_ if front else OPS.penalty_grad_


def _acc(front):
    return mk.abs_accumulate_ if front else OPS.abs_accumulate_


def _outer(front):
    return mk.abs_outer_accumulate_ if front else OPS.abs_outer_accumulate_


def _bmm(front, budget=1 << 20):
    if front:
        return lambda omega, a, b, alpha, memory_budget=budget: mk.abs_bmm_accumulate_(
            omega, a, b, alpha, memory_budget=memory_budget)
    return lambda omega, a, b, alpha, memory_budget=budget: OPS.abs_bmm_accumulate_(omega, a, b, alpha, memory_budget)


def _refused(call, match, *written):
    """``call()`` raises ValueError matching ``match``, and every tensor in ``written`` is as it was."""
    before = [t.clone() for t in written]
    with pytest.raises(ValueError, match=match):
        call()
    for i, (t, b) in enumerate(zip(written, before)):
        assert torch.equal(t, b) or (t.isnan() == b.isnan()).all() and torch.equal(t.nan_to_num(), b.nan_to_num()), \
            f"tensor {i} was written by a refused call"


# ------------------------------------------------------------- 1. abs_bmm through torch.ops
@FRONT
@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, 1e39, -0.5])
def test_abs_bmm_bad_alpha_refused(backend, front, alpha):
    omega = torch.zeros(4, 5)
    _refused(lambda: _bmm(front)(omega, torch.ones(2, 3, 4), torch.ones(2, 3, 5), alpha), "alpha", omega)


@FRONT
@pytest.mark.parametrize("budget", [0, -1, 1024, (64 << 10) - 1])
def test_abs_bmm_small_memory_budget_refused(backend, front, budget):
    omega = torch.zeros(4, 5)
    _refused(lambda: _bmm(front)(omega, torch.ones(2, 3, 4), torch.ones(2, 3, 5), 1.0, budget),
             rf"abs_bmm_accumulate_: memory_budget={budget} bytes is below the minimum 65536", omega)


@pytest.mark.parametrize("budget", [1.5e6, True, "64M"])
def test_abs_bmm_non_int_memory_budget_refused(backend, budget):
    omega = torch.zeros(4, 5)
    a, b = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
    with pytest.raises(ValueError, match="abs_bmm_accumulate_: memory_budget must be an int"):
        mk.abs_bmm_accumulate_(omega, a, b, memory_budget=budget)
    # Through torch.ops the schema's int refuses it first, naming the argument.
    if not isinstance(budget, bool):
        with pytest.raises((TypeError, RuntimeError), match="memory_budget"):
            OPS.abs_bmm_accumulate_(omega, a, b, 1.0, budget)
    assert omega.count_nonzero() == 0


@FRONT
def test_abs_bmm_expanded_omega_refused(backend, front):
    # The native kernel wrote every element 30 times over where 10 is right.
    base = torch.zeros(1, 5)
    omega = base.expand(4, 5)
    _refused(lambda: _bmm(front)(omega, torch.ones(2, 3, 4), torch.ones(2, 3, 5), 1.0),
             "omega has elements that share memory", base)


@FRONT
def test_abs_bmm_inference_omega_outside_inference_mode_refused(backend, front):
    with torch.inference_mode():
        omega = torch.zeros(4, 5)
    _refused(lambda: _bmm(front)(omega, torch.ones(2, 3, 4), torch.ones(2, 3, 5), 1.0),
             "omega is an inference tensor", omega)
    with torch.inference_mode():  # inside inference mode it is a plain update
        _bmm(front)(omega, torch.ones(2, 3, 4), torch.ones(2, 3, 5), 1.0)
    assert torch.equal(omega, torch.full((4, 5), 6.0))


@FRONT
def test_abs_bmm_omega_overlapping_an_input_refused(backend, front):
    buf = torch.randn(2 * 3 * 4 + 20)
    a = buf[:24].view(2, 3, 4)
    omega = buf[4:24].view(4, 5)
    _refused(lambda: _bmm(front)(omega, a, torch.ones(2, 3, 5), 1.0), "omega shares memory with a", buf)


@FRONT
@pytest.mark.parametrize("alpha", [-0.5, -1e-30, math.nan])
def test_accumulations_refuse_negative_or_nan_alpha(backend, front, alpha):
    # Importance is a sum of terms >= 0: a negative scale would make Omega shrink or turn negative.
    omega, omegas = torch.zeros(3, 4), [torch.zeros(3)]
    _refused(lambda: _outer(front)(omega, torch.ones(2, 3), torch.ones(2, 4), alpha), "alpha", omega)
    _refused(lambda: _acc(front)(omegas, [torch.ones(3)], alpha), "alpha", *omegas)
    _acc(front)(omegas, [torch.ones(3)], 0.0)  # zero is fine
    assert omegas[0].count_nonzero() == 0


def test_a_layout_first_seen_under_inference_mode_works_outside_it(backend):
    # Triton keeps an address table per layout; one made under inference_mode was an inference
    # tensor, which the next call of that layout outside inference mode could not update.
    with torch.inference_mode():
        omegas = [torch.zeros(5)]
        mk.abs_accumulate_(omegas, [torch.ones(5)], 1.0)
        grads = [torch.zeros(5)]
        mk.penalty_grad_([torch.ones(5)], [torch.zeros(5)], [torch.ones(5)], 1.0, grads)
    omegas = [torch.zeros(5)]
    mk.abs_accumulate_(omegas, [-torch.ones(5)], 2.0)
    grads = [torch.zeros(5)]
    value = mk.penalty_grad_([torch.ones(5)], [torch.zeros(5)], [torch.ones(5)], 1.0, grads)
    assert omegas[0].tolist() == [2.0] * 5 and grads[0].tolist() == [2.0] * 5 and value.item() == 5.0


# ------------------------------------------------------------- 2. shapes through torch.ops
@FRONT
def test_penalty_grad_shorter_grad_refused(backend, front):
    # Triton wrote past the end of the 3-element grad.
    storage = torch.zeros(8)
    grad = storage[:3]
    p, a, o = torch.ones(8), torch.zeros(8), torch.ones(8)
    _refused(lambda: _pen(front)([p], [a], [o], 1.0, [grad]), r"grads\[0\] has shape \(3,\) but params\[0\] has "
             r"shape \(8,\)", storage)


@FRONT
def test_penalty_grad_shorter_anchor_or_omega_refused(backend, front):
    g = torch.zeros(8)
    _refused(lambda: _pen(front)([torch.ones(8)], [torch.zeros(3)], [torch.ones(8)], 1.0, [g]),
             r"anchors\[0\] has shape", g)
    _refused(lambda: _pen(front)([torch.ones(8)], [torch.zeros(8)], [torch.ones(3)], 1.0, [g]),
             r"omegas\[0\] has shape", g)
    _refused(lambda: _pen(front)([torch.ones(8)], [torch.zeros(8)], [torch.ones(8), torch.ones(8)], 1.0, [g]),
             "omegas has 2 tensors but params has 1", g)


@FRONT
def test_abs_accumulate_shape_mismatch_refused(backend, front):
    omegas = [torch.zeros(8), torch.zeros(4)]
    _refused(lambda: _acc(front)(omegas, [torch.ones(8), torch.ones(3)], 1.0),
             r"tensors\[1\] has shape \(3,\) but omegas\[1\] has shape \(4,\)", *omegas)
    _refused(lambda: _acc(front)(omegas, [torch.ones(8)], 1.0), "tensors has 1 tensors but omegas has 2", *omegas)


@FRONT
def test_abs_outer_shape_mismatch_refused(backend, front):
    omega = torch.zeros(4, 5)
    _refused(lambda: _outer(front)(omega, torch.ones(3, 4), torch.ones(2, 5), 1.0), "a has 3 rows", omega)
    _refused(lambda: _outer(front)(omega, torch.ones(3, 6), torch.ones(3, 5), 1.0), "omega has shape", omega)


@FRONT
def test_dtypes_and_devices_refused(backend, front):
    g, o = torch.zeros(3), torch.zeros(3)
    _refused(lambda: _pen(front)([torch.ones(3, dtype=torch.int32)], [torch.zeros(3)], [torch.ones(3)], 1.0, [g]),
             r"params\[0\] has dtype torch.int32", g)
    _refused(lambda: _acc(front)([torch.zeros(3, dtype=torch.bfloat16)], [torch.ones(3)], 1.0),
             r"omegas\[0\] has dtype torch.bfloat16, expected float32/float64", o)
    mixed = lambda: _pen(front)([torch.ones(3)], [torch.zeros(3, device="meta")], [torch.ones(3)], 1.0, [g])  # noqa
    if front:
        _refused(mixed, r"anchors\[0\] is on meta but params\[0\] is on cpu", g)
    else:  # the dispatcher sends a call with a meta tensor to the fake kernel, which writes nothing
        mixed()
        assert g.count_nonzero() == 0


# ------------------------------------------------------------- 3. outputs overlapping inputs
@FRONT
def test_penalty_grad_grad_overlapping_its_param_refused(backend, front):
    # Triton was off by up to 0.78; now every backend refuses.
    n = 4096
    buf = torch.randn(n + 1)
    _refused(lambda: _pen(front)([buf[:n]], [torch.zeros(n)], [torch.rand(n)], 0.5, [buf[1:]]),
             r"grads\[0\] shares memory with params\[0\]", buf)


@FRONT
def test_abs_accumulate_omega_overlapping_its_tensor_refused(backend, front):
    n = 4096
    buf = torch.rand(n + 1)
    _refused(lambda: _acc(front)([buf[1:]], [buf[:n]], 1.0), r"omegas\[0\] shares memory with tensors\[0\]", buf)


@FRONT
def test_output_sharing_memory_with_another_entry_refused(backend, front):
    # An output that another entry reads (even as the very same tensor) or writes in part.
    x, y = torch.rand(6), torch.rand(6)
    _refused(lambda: _acc(front)([x, y], [y, torch.ones(6)], 1.0), r"omegas\[1\] shares memory with tensors\[0\]",
             x, y)
    buf = torch.zeros(10)
    _refused(lambda: _acc(front)([buf[:6], buf[4:]], [torch.ones(6), torch.ones(6)], 1.0),
             r"omegas\[0\] and omegas\[1\] share memory", buf)
    g = torch.zeros(6)
    _refused(lambda: _pen(front)([torch.ones(6), g], [torch.zeros(6)] * 2, [torch.ones(6)] * 2, 1.0, [g, torch.zeros(6)]),
             r"grads\[0\] shares memory with params\[1\]", g)
    buf = torch.rand(7)
    _refused(lambda: _pen(front)([torch.ones(6)], [torch.zeros(6)], [buf[:6]], 1.0, [buf[1:]]),
             r"grads\[0\] shares memory with omegas\[0\]", buf)


@FRONT
def test_omega_overlapping_an_input_in_part_refused(backend, front):
    buf = torch.rand(40)
    omega = buf[:20].view(4, 5)
    _refused(lambda: _outer(front)(omega, buf[16:28].view(3, 4), torch.ones(3, 5), 1.0), "omega shares memory with a",
             buf)


# ------------------------------------------------------------- 4. elements sharing memory in one output
def _self_overlapping(base_numel=10):
    base = torch.zeros(base_numel)
    return base, base.as_strided((3, 3), (1, 1))  # element (i, j) at i + j: no stride 0, still overlapping


@FRONT
def test_as_strided_self_overlapping_outputs_refused(backend, front):
    base, out = _self_overlapping()
    _refused(lambda: _pen(front)([torch.ones(3, 3)], [torch.zeros(3, 3)], [torch.ones(3, 3)], 1.0, [out]),
             r"grads\[0\] has elements that share memory", base)
    _refused(lambda: _acc(front)([out], [torch.ones(3, 3)], 1.0), r"omegas\[0\] has elements that share memory", base)
    _refused(lambda: _outer(front)(out, torch.ones(2, 3), torch.ones(2, 3), 1.0), "omega has elements that share memory",
             base)
    _refused(lambda: _bmm(front)(out, torch.ones(2, 2, 3), torch.ones(2, 2, 3), 1.0),
             "omega has elements that share memory", base)


def test_penalty_refuses_through_torch_ops_too(backend):
    p = torch.ones(3, requires_grad=True)
    for lam, match in [(math.nan, "lam"), (2e38, "lam")]:
        with pytest.raises(ValueError, match=match):
            OPS.penalty([p], [torch.zeros(3)], [torch.ones(3)], lam)
    with pytest.raises(ValueError, match=r"omegas\[0\] has shape"):
        OPS.penalty([p], [torch.zeros(3)], [torch.ones(4)], 1.0)


# ------------------------------------------------------------- what stays allowed
def test_interleaved_disjoint_views_accepted(backend):
    # The two column halves of one matrix: their byte ranges interleave, no element is shared.
    buf = torch.zeros(6, 8)
    left, right = buf[:, :4], buf[:, 4:]
    mk.abs_accumulate_([left, right], [torch.ones(6, 4), -2 * torch.ones(6, 4)], 1.0)
    assert torch.equal(left, torch.ones(6, 4)) and torch.equal(right, torch.full((6, 4), 2.0))
    x = buf[:, 4:] + 1.0
    omega = buf[:3, :4]  # reads b from the right half of the same rows
    OPS.abs_outer_accumulate_(omega, torch.ones(2, 3), buf[:2, 4:], 1.0)
    assert torch.equal(omega, torch.ones(3, 4) + 2 * 2.0)
    del x


def test_output_that_is_its_own_input_accepted(backend):
    x = torch.tensor([1.0, -2.0, 3.0])
    mk.abs_accumulate_([x], [x], 0.5)  # each element read, then written
    assert x.tolist() == [1.5, -1.0, 4.5]
    g = torch.tensor([1.0, 2.0, 3.0])
    value = OPS.penalty_grad_([g], [torch.zeros(3)], [torch.ones(3)], 1.0, [g])  # grad is its own param
    assert value.item() == 14.0 and g.tolist() == [3.0, 6.0, 9.0]


def test_same_output_twice_accepted(backend):
    o = torch.zeros(5)
    t1, t2 = torch.randn(5), torch.randn(5)
    OPS.abs_accumulate_([o, o], [t1, t2], 1.0)
    assert_close(o, ref.abs_accumulate([torch.zeros(5)], [t1], 1.0)[0] + t2.double().abs(), name="o")


# ------------------------------------------------------------- the template
def test_define_requires_a_guard():
    with pytest.raises(TypeError):
        _library.define("no_guard_op(Tensor x) -> ()", lambda x: None, {"torch": "builtins:print"})
    with pytest.raises(TypeError, match="guard must be a callable"):
        _library.define("no_guard_op(Tensor x) -> ()", lambda x: None, {"torch": "builtins:print"}, guard=None)
    assert "no_guard_op" not in _library.OPS


def test_every_op_has_its_guard_in_front_of_its_python_kernels():
    names = {"abs_outer_accumulate_", "abs_accumulate_", "abs_bmm_accumulate_", "penalty_grad_", "penalty",
             "adam_penalty_step_", "sgd_penalty_step_"}
    assert set(_library.OPS) == names
    for name, op in _library.OPS.items():
        assert callable(op.guard), name
        calls = []
        kernel = _library.Op(name, {"torch": "builtins:print"}, (), lambda *a: calls.append(a) or 1 / 0).kernel("torch")
        with pytest.raises(ZeroDivisionError):
            kernel(1, 2)
        assert calls == [(1, 2)]


def test_prevalidated_applies_to_one_kernel_call_only(backend):
    # A call through prevalidated skips the Python guard once; the next plain call is guarded again.
    o = torch.zeros(3)
    _library.prevalidated(OPS.abs_accumulate_, [o], [torch.ones(3)], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        OPS.abs_accumulate_([o], [torch.ones(3)], math.nan)
    assert o.tolist() == [1.0] * 3


def test_one_memory_budget_definition():
    assert abs_bmm_module.DEFAULT_MEMORY_BUDGET == 256 << 20
    model = torch.nn.Linear(3, 2)
    assert mk.MAS(model)._options.memory_budget == abs_bmm_module.DEFAULT_MEMORY_BUDGET
    for bad in (0, -5, 1.5, True, (64 << 10) - 1):
        with pytest.raises(ValueError, match="MAS: memory_budget"):
            mk.MAS(model, memory_budget=bad)
    if _native.built():
        assert _native.lib().min_memory_budget() == abs_bmm_module.MIN_MEMORY_BUDGET


# ------------------------------------------------------------- the wrapper's fast path
def _trained():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    mas = mk.MAS(model, importance="global_batch")
    mas.estimate([torch.randn(8, 6)]).consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, mas


def test_training_step_grads_are_guarded_after_they_change(backend):
    # The per-step path skips the Python guard for lists it guarded before; a .grad that
    # changes to one sharing memory with another parameter's is refused all the same.
    model, mas = _trained()
    model.zero_grad(set_to_none=True)
    mas.add_penalty_grad_()
    mas.add_penalty_grad_()  # the fast path
    w0, w2 = model[0].weight, model[2].weight
    shared = torch.zeros(w0.numel() + w2.numel())
    w0.grad = shared[:w0.numel()].view_as(w0)
    w2.grad = shared[w0.numel() - 1:w0.numel() - 1 + w2.numel()].view_as(w2)  # one element in common
    with pytest.raises(ValueError, match=r"share memory"):
        mas.add_penalty_grad_()
    assert shared.count_nonzero() == 0
    w2.grad = torch.zeros_like(w2)
    value = mas.add_penalty_grad_()
    assert value.item() > 0 and shared.count_nonzero() > 0


def test_training_step_checks_lam_on_the_fast_path(backend):
    model, mas = _trained()
    model.zero_grad(set_to_none=True)
    mas.add_penalty_grad_()
    reg = mas._regularizer
    reg.lam = math.nan  # bypassing MAS.lam's setter: the op still refuses it
    with pytest.raises(ValueError, match="lam"):
        mas.add_penalty_grad_()
    with pytest.raises(ValueError, match="lam"):
        mas.penalty()


def test_triton_interpreter_is_what_the_triton_backend_runs(backend):
    # (The backend fixture really switches kernels: the guard tests above ran on each.)
    assert _backend.choose(torch.device("cpu")) == backend


def test_compiled_front_door_leaves_no_skipped_guard_behind(backend):
    # Under torch.compile the front door's call is a plain one: the compiled graph's kernel runs the
    # guard, and no "skip the next guard" flag is left for a later eager call.
    import torch._dynamo

    torch._dynamo.reset()
    p = [torch.randn(3)]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(a, o, g):
        return mk.penalty_grad_(p, a, o, 0.5, g)

    g = [torch.zeros(3)]
    step([torch.zeros(3)], [torch.ones(3)], g)
    assert not _library._TRUST.skip
    with pytest.raises(ValueError, match="alpha"):
        OPS.abs_accumulate_([torch.zeros(3)], [torch.ones(3)], math.nan)
