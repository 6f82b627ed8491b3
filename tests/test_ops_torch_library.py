"""The ops as ``torch.library`` custom ops: opcheck, and torch.compile of a training step.

opcheck runs each op several times (schema, fake tensors, autograd
registration, AOT dispatch), so the tensors here are small.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend

import mas_kernels as mk
from tests.helpers import BF16, F16, F32, using_backend

OPS = torch.ops.mas_kernels


def _assert_opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


# ------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, BF16)], ids=str)
def test_opcheck_abs_outer(backend, dtypes):
    a = torch.randn(6, 3, dtype=dtypes[0])
    b = torch.randn(5, 6, dtype=dtypes[1]).t()  # a transposed view
    _assert_opcheck(OPS.abs_outer_accumulate_.default, (torch.rand(3, 5), a, b, 0.5))


def test_opcheck_abs_accumulate(backend):
    omegas = [torch.rand(3, 5), torch.rand(7), torch.rand(4, 2).t()]
    tensors = [torch.randn(3, 5), torch.randn(7, dtype=F16), torch.randn(2, 4, dtype=BF16)]
    _assert_opcheck(OPS.abs_accumulate_.default, (omegas, tensors, 0.5))


def test_opcheck_penalty_grad(backend):
    params = [torch.randn(3, 5), torch.randn(7, dtype=BF16)]
    anchors = [torch.randn(3, 5), torch.randn(7)]
    omegas = [torch.rand(3, 5), torch.rand(7)]
    grads = [torch.zeros(3, 5), torch.zeros(7, dtype=BF16)]
    _assert_opcheck(OPS.penalty_grad_.default, (params, anchors, omegas, 0.3, grads))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_opcheck_penalty(backend, dtype):
    params = [torch.randn(3, 5, dtype=dtype, requires_grad=True), torch.randn(7, dtype=dtype, requires_grad=True)]
    anchors = [torch.randn(3, 5), torch.randn(7, dtype=dtype)]
    omegas = [torch.rand(3, 5), torch.rand(7)]
    _assert_opcheck(OPS.penalty.default, (params, anchors, omegas, 0.3))


def test_ops_are_registered():
    for name in ("abs_outer_accumulate_", "abs_accumulate_", "penalty_grad_", "penalty"):
        assert hasattr(OPS, name), name


# ------------------------------------------------------------- torch.compile
# A training step in one graph: forward, loss (+ the penalty), backward, and a
# plain SGD update. (torch.optim graph-breaks on purpose around step() and
# zero_grad(), so the update is written out; tracing .backward() needs Dynamo's
# trace_autograd_ops.)
LAM, LR = 0.5, 0.1


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    anchors = [p.detach() + 0.1 * torch.randn_like(p) for p in model.parameters()]
    omegas = [torch.rand_like(p) for p in model.parameters()]
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(3)]
    return model, anchors, omegas, data


def _sgd(model):
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(LR * p.grad)
            p.grad = None


def _make_steps(anchors, omegas):
    def step_penalty(model, x, y):
        params = list(model.parameters())
        loss = torch.nn.functional.cross_entropy(model(x), y) + mk.penalty(params, anchors, omegas, LAM)
        loss.backward()
        _sgd(model)
        return loss.detach()

    def step_penalty_grad(model, x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        value = mk.penalty_grad_(list(model.parameters()), anchors, omegas, LAM)
        _sgd(model)
        return loss.detach() + value

    return {"penalty": step_penalty, "penalty_grad_": step_penalty_grad}


def _recording(name, graphs):
    inner = lookup_backend(name)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return backend


def _check_compiled_step(which, compile_backend, atol=1e-6, rtol=1e-5):
    model, anchors, omegas, data = _setup()
    step = _make_steps(anchors, omegas)[which]
    eager_model, compiled_model = model, copy.deepcopy(model)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=_recording(compile_backend, graphs), fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for x, y in data:
            want = step(eager_model, x, y)
            got = compiled(compiled_model, x, y)
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # One graph, traced once, and it holds the custom op (not an eager fallback).
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any(f"mas_kernels.{which}" in t for t in targets), targets
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, atol=atol, rtol=rtol)


@pytest.mark.parametrize("which", ["penalty", "penalty_grad_"])
def test_compile_training_step_aot_eager(backend, which):
    _check_compiled_step(which, "aot_eager")


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.slow
def test_compile_training_step_inductor():
    with using_backend("torch"):
        _check_compiled_step("penalty", "inductor")


# ------------------------------------------------- autograd and version counters
def _mutating_calls():
    """(name, call, the tensors it writes) for each in-place op, called through torch.ops."""
    omega = torch.rand(3, 5)
    omegas = [torch.rand(3, 5), torch.rand(7)]
    grads = [torch.zeros(3, 5), torch.zeros(7, dtype=BF16)]
    params = [torch.randn(3, 5, requires_grad=True), torch.randn(7, dtype=BF16, requires_grad=True)]
    return [
        ("abs_outer_accumulate_", lambda: OPS.abs_outer_accumulate_(omega, torch.randn(4, 3), torch.randn(4, 5), 0.5),
         [omega]),
        ("abs_accumulate_", lambda: OPS.abs_accumulate_(omegas, [torch.randn(3, 5), torch.randn(7)], 0.5), omegas),
        ("penalty_grad_", lambda: OPS.penalty_grad_(params, [torch.randn(3, 5), torch.randn(7)],
                                                    [torch.rand(3, 5), torch.rand(7)], 0.3, grads), grads),
    ]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["abs_outer", "abs_accumulate", "penalty_grad"])
def test_inplace_ops_bump_version_and_record_no_graph(backend, which):
    # Like a PyTorch in-place op: each written tensor's version counter moves
    # (native and Triton write through raw pointers, which autograd cannot see),
    # and, being non-differentiable, the op records nothing even when params
    # require grad.
    name, call, written = _mutating_calls()[which]
    before = [t._version for t in written]
    out = call()
    assert all(t._version > v for t, v in zip(written, before)), name
    assert all(t.grad_fn is None and not t.requires_grad for t in written), name
    if out is not None:
        assert not out.requires_grad and out.grad_fn is None


def test_version_bump_catches_a_tensor_saved_for_backward():
    # The point of the bump: autograd refuses a backward that would read a
    # tensor changed in place since it was saved.
    omega = torch.rand(3, 5)
    x = torch.rand(3, 5, requires_grad=True)
    y = (x * omega).sum()  # saves omega
    OPS.abs_outer_accumulate_(omega, torch.randn(4, 3), torch.randn(4, 5), 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_outputs_requiring_grad_are_refused_under_grad_mode(backend):
    leaf = torch.zeros(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="omega requires grad"):
        mk.abs_outer_accumulate_(leaf * 1, torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"omegas\[1\] requires grad"):
        mk.abs_accumulate_([torch.zeros(2), leaf[0] * 1], [torch.randn(2), torch.randn(5)])
    p = [torch.randn(3, 5, requires_grad=True)]
    with pytest.raises(ValueError, match=r"grads\[0\] requires grad"):
        mk.penalty_grad_(p, [torch.randn(3, 5)], [torch.rand(3, 5)], 1.0, [leaf * 1])
    p[0].grad = leaf * 1
    with pytest.raises(ValueError, match=r"params\[0\]\.grad requires grad"):
        mk.penalty_grad_(p, [torch.randn(3, 5)], [torch.rand(3, 5)], 1.0)
    # Under no_grad the same calls are plain in-place updates (as for a PyTorch leaf).
    with torch.no_grad():
        omega = leaf * 1
        mk.abs_outer_accumulate_(omega, torch.ones(4, 3), torch.ones(4, 5))
    torch.testing.assert_close(omega.detach(), torch.full((3, 5), 4.0))


def test_ops_work_on_inference_tensors(backend):
    # Inference tensors have no version counter: the bump must skip them, not fail.
    with torch.inference_mode():
        omega = torch.zeros(3, 4)
        mk.abs_outer_accumulate_(omega, torch.ones(2, 3), -torch.ones(2, 4))
        grads = [torch.zeros(3)]
        value = mk.penalty_grad_([torch.ones(3)], [torch.zeros(3)], [torch.full((3,), 2.0)], 0.5, grads)
        omegas = [torch.zeros(3)]
        mk.abs_accumulate_(omegas, [-torch.ones(3)], 2.0)
        pen = mk.penalty([torch.ones(3)], [torch.zeros(3)], [torch.full((3,), 2.0)], 0.5)
    assert torch.equal(omega, torch.full((3, 4), 2.0))
    assert value.item() == 3.0 and pen.item() == 3.0 and grads[0].tolist() == [2.0] * 3
    assert omegas[0].tolist() == [2.0] * 3


# ------------------------------------------------- a lam schedule under torch.compile (issue 21, item 12)
@pytest.mark.parametrize("how", ["penalty", "add_penalty_grad_"])
def test_lam_schedule_compiles_once(how):
    # Six lam values, one graph: lam is a runtime value of the graph (a 0-d tensor updated in
    # place by the setter), not a constant baked into it. Each step equals the eager step with the
    # same lam, and the graph holds the custom op (no silent fall-back to eager). (The mechanism is
    # the Regularizer's, the same whichever kernel serves the op: the default backend only.)
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        mas = mk.MAS(model, importance="global_batch")
        mas.estimate([torch.randn(8, 6)]).consolidate()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model, mas

    def make_step(model, mas):
        def step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if how == "penalty":
                loss = loss + mas.penalty()
                loss.backward()
                value = loss.detach()
            else:
                loss.backward()
                value = loss.detach() + mas.add_penalty_grad_()
            _sgd(model)
            return value
        return step

    eager_model, eager_mas = setup()
    model, mas = setup()
    eager_step, step = make_step(eager_model, eager_mas), make_step(model, mas)
    graphs = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend=_recording("aot_eager", graphs), fullgraph=True)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for lam in (0.1, 0.25, 1.0, 3.0, 7.5, 0.0):
            mas.lam = eager_mas.lam = lam
            torch.testing.assert_close(compiled(x, y), eager_step(x, y), atol=1e-6, rtol=1e-5)
            for p, q in zip(model.parameters(), eager_model.parameters()):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    graphs = [g for g in graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(graphs) == 1, f"{len(graphs)} graphs for 6 lam values"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("mas_kernels.penalty" in t for t in targets), targets
