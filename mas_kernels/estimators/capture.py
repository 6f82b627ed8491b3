"""One recorded forward and backward: each layer's inputs and the gradient w.r.t. its outputs.

:func:`capture` runs the model once with forward hooks on the layers that
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

from .layout import call_leaves, tensor_leaves


@dataclasses.dataclass
class Call:
    """One call of a layer: what it got, what it returned, the loss gradient w.r.t. what it returned."""

    args: tuple
    kwargs: dict
    output: Any
    deltas: list  # per output tensor (in tree_flatten order): the gradient, None until backward gives one
    versions: list  # the output tensors' version counters when the layer returned them
    replay: Any = None  # what a rule's own forward left for it (an RNN's step-by-step replay)
    targets: list = dataclasses.field(default_factory=list)  # more tensors the backward must reach
    dims: Any = None  # where its tensors keep the batch's samples (a layout.CallDims, as observed)
    outs: list | None = None  # the output's tensors (tree_flatten order), once found

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
    """Forward hooks that record every call of ``modules`` (a dict of module -> list of calls).

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
        self.handles: list = []

    def _hook(self, module, args, kwargs, output):
        from .layout import expand_call

        if threading.get_ident() != self._thread:
            return None  # another thread's forward of the same model: not this pass
        calls = self.calls[module]
        dims = self.layout.dims_of(module, len(calls)) if self.layout is not None else None
        new = None
        if dims is not None and dims.expand is not None:
            args, new = expand_call(args, output, dims.expand, self.n)
            output = new
        outs = tensor_leaves(output)
        call = Call(args, kwargs, output, [None] * len(outs), [t._version for t in outs], dims=dims, outs=outs)
        replay = self._pending.pop(module, None)
        if replay is not None:
            call.replay, call.targets = replay, replay.targets()
        if self.grads:
            then = self.then(module, call) if self.then is not None and len(outs) == 1 else None
            for i, t in enumerate(outs):
                if t.requires_grad:
                    t.register_hook(_store(call.deltas, i, then))
        calls.append(call)
        return new

    def check(self, n: int) -> None:
        """Raise :class:`LayoutChanged` when the calls do not match the layout they were recorded with."""
        from .layout import Flat, UNKNOWN

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

    def __enter__(self) -> "Recorder":
        self._thread = threading.get_ident()
        self._pending: dict = {}
        self._forwards: list = []
        for m in self.calls:
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
            if self.grads and m in self.inline:
                self._inline(m, self.inline[m])
        return self

    def _inline(self, module: nn.Module, layer) -> None:
        """Run ``layer.rule.inline_forward`` as the module's forward during the recorded pass."""
        had = "forward" in module.__dict__
        self._forwards.append((module, had, module.__dict__.get("forward")))

        def forward(*args, **kwargs):
            if threading.get_ident() != self._thread:  # another thread's forward of the same model: its own
                return own(*args, **kwargs)
            out, replay = layer.rule.inline_forward(layer, args, kwargs)
            self._pending[module] = replay
            return out

        own = module.forward  # bound before the replacement: the module's own forward

        module.forward = forward

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module, had, old in self._forwards:
            if had:
                module.forward = old
            else:
                del module.forward
        self._forwards.clear()


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
    """One backward pass of ``loss`` that fills the recorded calls' ``deltas``, writing no ``.grad``."""
    targets: dict[int, torch.Tensor] = {}
    for module, calls in rec.calls.items():
        for call in calls:
            for t in call.targets:
                targets[id(t)] = t
            ins = [t for t in call_leaves(call.args, call.kwargs) if isinstance(t, torch.Tensor) and t.requires_grad]
            if ins:
                for t in ins:
                    targets[id(t)] = t
                continue
            outs = call.outputs
            if any(t.requires_grad and t._version == v for t, v in zip(outs, call.versions)):
                for t, v in zip(outs, call.versions):
                    if t.requires_grad and t._version == v:
                        targets[id(t)] = t
            else:
                # Every output was overwritten in place downstream: asking for its gradient would give
                # that of the overwriting op. A parameter of the layer sits behind the original output.
                ps = [p for p in module.parameters() if p.requires_grad]
                if ps:
                    p = min(ps, key=lambda q: q.numel())
                    targets[id(p)] = p
    if targets and loss.requires_grad:
        grad(loss, _upstream(list(targets.values())), allow_unused=True, retain_graph=retain_graph)


def _upstream(targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """``targets`` less those the backward reaches anyway on its way to another target: a target whose
    ``grad_fn`` leads (through ``next_functions``) to another target's ``grad_fn`` runs, and so fires its
    tensor hooks, without being asked for. ``autograd.grad`` holds every gradient it was asked for until it
    returns: asking only for the upstream ones keeps the others (the layers' input gradients, as large as
    their activations) from living to the end of the backward."""
    nodes = {t.grad_fn for t in targets if t.grad_fn is not None}
    if len(nodes) < 2:
        return targets
    reaches: dict = {}  # node -> whether a target's node lies strictly below it
    for start in nodes:
        stack = [(start, iter(start.next_functions))]
        on_path = {start}
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                on_path.discard(node)
                if node not in reaches:
                    reaches[node] = False
                continue
            child = nxt[0]
            if child is None:
                continue
            if child in nodes or reaches.get(child):
                for n, _ in stack:
                    reaches[n] = True
                continue
            if child in reaches or child in on_path:
                continue
            on_path.add(child)
            stack.append((child, iter(child.next_functions)))
    return [t for t in targets if t.grad_fn is None or not reaches.get(t.grad_fn)]


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
