"""One recorded forward and backward: each layer's inputs and the gradient w.r.t. its outputs.

:func:`capture` runs the model once with forward wrappers on the layers that
have rules; each call of a layer is a :class:`Call` (its positional and keyword
arguments and its output). A tensor hook on each output, registered before
anything downstream can overwrite it in place (``ReLU(inplace=True)`` after a
Linear), receives the gradient of the loss w.r.t. that output as it was when
the layer returned it. :func:`backward` then runs one backward pass of the
loss that reaches every recorded layer and computes no parameter gradient it
does not have to: it asks for the gradients w.r.t. the layers' inputs (or,
for a layer whose inputs need no gradient, w.r.t. its output, or one of its
parameters when that output was overwritten in place).

The per-layer rules turn ``(call.args, call.delta)`` into per-sample
gradients; the whole model's per-sample gradients are never formed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch._C import _FunctionBase
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .layout import UNKNOWN, Flat, Forwards, call_leaves, expand_call, no_mha_fastpath, tensor_leaves


@dataclasses.dataclass
class Call:
    """One call of a layer: what it got, what it returned, the loss gradient w.r.t. what it returned."""

    args: tuple
    kwargs: dict
    output: Any
    deltas: list  # per output tensor (in tree_flatten order): the gradient, None until backward gives one
    edges: list  # per output tensor: its gradient edge as the layer returned it (None: needs no gradient)
    replay: Any = None  # what a rule's own forward left for it (an RNN's step-by-step replay)
    targets: list = dataclasses.field(default_factory=list)  # more tensors the backward must reach
    dims: Any = None  # where its tensors keep the batch's samples (a layout.CallDims, as observed)
    outs: list | None = None  # the output's tensors (tree_flatten order), once found
    eager: bool = False  # its rule runs inside the backward, from a tensor hook on its output (Recorder's then)

    @property
    def outputs(self) -> list[torch.Tensor]:
        if self.outs is None:
            self.outs = tensor_leaves(self.output)
        return self.outs

    @property
    def x(self) -> torch.Tensor:
        """The first positional argument (a layer's input)."""
        return self.args[0]

    @property
    def delta(self) -> torch.Tensor:
        """The gradient w.r.t. the (first) output; zeros when the output did not reach the loss."""
        d = self.deltas[0]
        return torch.zeros_like(self.outputs[0]) if d is None else d


class LayoutChanged(Exception):
    """The recorded calls do not match the observed layout (another call count, or a sample dim whose size
    is not N): the layout is observed again."""


class Recorder:
    """Forward wrappers (``layout.Forwards``) that record every call of ``modules`` (a dict of module -> list of
    calls).

    ``layout``: the observed layout; each call gets its :class:`~.layout.CallDims`, and a shared call
    the layout says to broadcast is expanded to the batch's ``n`` samples in place of its output.
    ``inline``: module -> plan layer whose rule's ``inline_forward`` replaces the module's forward.
    ``then``: ``(module, call) -> callable or None``: for a call with one output, what to run right after its
    output gradient is stored (inside the backward).
    """

    def __init__(self, modules: list[nn.Module], grads: bool, layout=None, n: int = 1, inline: dict | None = None,
                 then: Callable | None = None):
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in modules}
        self.grads = grads
        self.layout = layout
        self.n = n
        self.inline = inline or {}
        self.then = then
        self.tensor_hooks: list = []  # the eager calls' output hooks, removed by release()

    def _hook(self, module, args, kwargs, output):
        if threading.get_ident() != self._thread:
            return None  # another thread's forward of the same model: not this pass
        calls = self.calls[module]
        dims = self.layout.dims_of(module, len(calls)) if self.layout is not None else None
        new = None
        if dims is not None and dims.expand is not None:
            args, new = expand_call(args, output, dims.expand, self.n)
            output = new
        if (self.grads and type(output) is tuple and len(output) > 1
                and all(isinstance(t, torch.Tensor) for t in output) and any(t.requires_grad for t in output)):
            # Several outputs: each handed on as a view of its own, so the gradient read at its edge is what the
            # rest of the model sends it. An output the module computed from another (an LSTM cell's h from its
            # c) would otherwise carry, at its own edge, the gradient that flowed back through the other too,
            # and a rule that pulls both outputs' gradients through the module would count that part twice.
            output = new = tuple(t.view_as(t) if t.requires_grad else t for t in output)
        outs = tensor_leaves(output)
        edges = [_edge(t) if t.requires_grad else None for t in outs] if self.grads else []
        call = Call(args, kwargs, output, [None] * len(outs), edges, dims=dims, outs=outs)
        if self._pending:
            replay = self._pending.pop(module, None)
            if replay is not None:
                call.replay, call.targets = replay, replay.targets()
        if self.then is not None and len(edges) == 1 and isinstance(edges[0], GradientEdge):
            # not a view (an in-place op on a view takes its node, and a hook, away)
            self._eager(module, call)
        calls.append(call)
        return new

    def check(self, n: int) -> None:
        """Raise :class:`LayoutChanged` when the calls do not match the layout they were recorded with."""
        if self.layout is None:
            return
        for module, calls in self.calls.items():
            seen = self.layout.calls.get(id(module), [])
            if len(calls) != len(seen):
                raise LayoutChanged(f"{type(module).__name__} called {len(calls)} times, {len(seen)} when observed")
            for call in calls:
                leaves = call_leaves(call.args, call.kwargs) + call.outputs
                for t, d in zip(leaves, call.dims.ins + call.dims.outs):
                    if not isinstance(t, torch.Tensor) or d is None or d is UNKNOWN or call.dims.rows:
                        continue
                    dim = d.dim if isinstance(d, Flat) else d
                    size = t.shape[dim] if t.dim() > dim else -1
                    if size != n and not (isinstance(d, Flat) and size > 0 and size % n == 0):
                        raise LayoutChanged(f"a tensor of shape {tuple(t.shape)} of {type(module).__name__} "
                                            f"has no {n} samples in dim {dim}")

    def release(self) -> None:
        """Remove the eager calls' output hooks (after the backward, or when it will not run). A hook holds its
        rule's closure, which holds the call and so the output whose graph node holds the hook: a cycle through
        the autograd graph that Python's collector cannot see, so without this every recorded pass (the whole
        graph and its saved tensors) would stay alive."""
        for h in self.tensor_hooks:
            h.remove()
        self.tensor_hooks.clear()

    def __enter__(self) -> "Recorder":
        self._thread = threading.get_ident()
        self._pending: dict = {}
        self._forwards = Forwards()
        self._fastpath = no_mha_fastpath()
        self._fastpath.__enter__()
        for m in self.calls:
            if self.grads and m in self.inline:
                self._forwards.wrap(m, self._inline(m, self.inline[m]))
            self._forwards.wrap(m, self._recording(m))
        return self

    def _recording(self, module: nn.Module) -> Callable:
        """The wrapper that records each call of ``module``: :meth:`_hook` on what its forward got and returned
        (and what it hands on: a broadcast shared call's output, a multi-output call's views)."""
        hook = self._hook

        def make(own):
            def forward(*args, **kwargs):
                out = own(*args, **kwargs)
                new = hook(module, args, kwargs, out)
                return out if new is None else new
            return forward
        return make

    def _eager(self, module: nn.Module, call: Call) -> None:
        """Run ``then(module, call)``'s callable, if any, once the gradient w.r.t. the call's one output is
        complete: a hook on the output tensor (it gets that gradient as the layer returned it, also after an
        in-place op; and also where the backward stops at that output's edge, asked for as an input by
        :func:`backward`, which a pre-hook on the node would not see: the node does not run then)."""
        run = self.then(module, call)
        if run is not None:
            self.tensor_hooks.append(call.outs[0].register_hook(_store(call.deltas, 0, run)))
            call.eager = True

    def _inline(self, module: nn.Module, layer) -> Callable:
        """Run ``layer.rule.inline_forward`` as the module's forward during the recorded pass."""
        def make(own):  # own: the module's forward before the replacement
            def forward(*args, **kwargs):
                if threading.get_ident() != self._thread:  # another thread's forward of the same model: its own
                    return own(*args, **kwargs)
                out, replay = layer.rule.inline_forward(layer, args, kwargs)
                self._pending[module] = replay
                return out
            return forward
        return make

    def __exit__(self, *exc) -> None:
        self._forwards.restore()
        self._fastpath.__exit__(None, None, None)


class _ViewEdge:
    """An output that is a whole-tensor view of its base (a Linear's on a sequence: ``addmm(...).view(N, T, J)``):
    an in-place op on it later (``ReLU(inplace=True)``) takes the view's own node out of the graph (the base
    gets a ``CopySlices``), so the gradient is then read at the base's edge as it was, in the view's shape."""

    __slots__ = ("edge", "base", "version")

    def __init__(self, edge, base, version):
        self.edge, self.base, self.version = edge, base, version


def _edge_of(t: torch.Tensor) -> GradientEdge:
    """``get_gradient_edge(t)``, without its Python checks for a tensor made by a C++ node (the usual case)."""
    fn = t.grad_fn
    if fn is None or isinstance(fn, _FunctionBase):  # a leaf, or a Python Function's output
        return get_gradient_edge(t)
    return GradientEdge(fn, t.output_nr)


def _edge(t: torch.Tensor):
    """``t``'s gradient edge as it is now (a :class:`_ViewEdge` for a whole-tensor view of its base)."""
    e = _edge_of(t)
    b = t._base
    if (b is not None and b.requires_grad and b.numel() == t.numel() and b.data_ptr() == t.data_ptr()
            and t.is_contiguous() and b.is_contiguous()):
        return _ViewEdge(e, _edge_of(b), t._version)
    return e


def _store(slots: list, i: int, then: Callable | None = None) -> Callable:
    def hook(grad):
        slots[i] = grad
        if then is not None:
            then()
    return hook


@contextlib.contextmanager
def capture(modules: list[nn.Module], grads: bool = True, layout=None, n: int = 1,
            inline: dict | None = None, then: Callable | None = None) -> Iterator[Recorder]:
    """Record the calls of ``modules`` during the block (with output gradients when ``grads``; ``then``: see
    :class:`Recorder`)."""
    with Recorder(modules, grads, layout, n, inline, then) as rec:
        yield rec


def backward(loss: torch.Tensor, rec: Recorder, retain_graph: bool = False) -> None:
    """One backward pass of ``loss`` that fills the recorded calls' ``deltas``, writing no ``.grad``: the
    gradients at the outputs' edges (and at the tensors a replay's hooks wait on, ``call.targets``).

    An eager call's output (``Call.eager``) is not asked for: its tensor hook runs the rule as the backward
    passes and drops the gradient (``autograd.grad`` would hold every gradient it was asked for until it
    returns). Only the lowest of those the backward would not reach on its way to the others is asked for."""
    inputs: list = []
    slots: list = []  # (call, output index, index in inputs, shape to view the gradient as)
    eager: dict = {}  # an eager call's output node -> its edge
    for calls in rec.calls.values():
        for call in calls:
            inputs.extend(call.targets)
            for i, e in enumerate(call.edges):
                if e is None:
                    continue
                if call.eager:
                    eager[e.node] = e
                    continue
                shape = None
                if isinstance(e, _ViewEdge):
                    t = call.outputs[i]
                    e, shape = (e.edge, None) if t._version == e.version else (e.base, t.shape)
                slots.append((call, i, len(inputs), shape))
                inputs.append(e)
    if not loss.requires_grad:
        return
    if eager and loss.grad_fn is not None:
        inputs.extend(_lowest_unreached(loss.grad_fn, inputs, eager))
    if inputs:
        grads = grad(loss, inputs, allow_unused=True, retain_graph=retain_graph)
        for call, i, j, shape in slots:
            g = grads[j]
            call.deltas[i] = g if shape is None or g is None else g.view(shape)


def _lowest_unreached(root, inputs: list, eager: dict) -> list:
    """The edges of the eager outputs that a backward asked only for ``inputs`` would not run (autograd runs
    the nodes with something asked for below them): the lowest of them, those with no other such output
    below; asked for too, they make the rest run. One walk of the graph from ``root``."""
    asked = {e.node if isinstance(e, GradientEdge) else _edge_of(e).node for e in inputs}
    below: dict = {}  # node -> (something asked for at or below it, an unreached eager node strictly below it)
    stack = [(root, iter(root.next_functions))]
    seen = {root}
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is not None:
            child = nxt[0]
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, iter(child.next_functions)))
            continue
        stack.pop()
        hit, lost = node in asked, False
        for child, _ in node.next_functions:
            if child is None:
                continue
            c_hit, c_lost = below[child]
            hit = hit or c_hit
            lost = lost or c_lost or (child in eager and not c_hit)
        below[node] = (hit, lost)
    return [e for node, e in eager.items() if node in below and below[node] == (False, False)]


def grad(outputs, inputs, *args, **kwargs):
    """``torch.autograd.grad``, with the error of a model checkpointed with ``use_reentrant=True`` (which
    ``torch.autograd.grad`` cannot go through) worded as what to do."""
    try:
        return torch.autograd.grad(outputs, inputs, *args, **kwargs)
    except RuntimeError as exc:
        msg = str(exc)
        if "Checkpointing is not compatible with .grad()" not in msg and not (
                "use_reentrant=True" in msg and "incompatible with .grad()" in msg):
            raise
        raise ValueError(
            "MAS: the model uses activation checkpointing with use_reentrant=True "
            "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True), or transformers' "
            "gradient_checkpointing_enable() with its default), which the importance's backward pass cannot go "
            "through; use use_reentrant=False (transformers: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or turn checkpointing off while "
            "estimating (model.gradient_checkpointing_disable())"
        ) from exc
