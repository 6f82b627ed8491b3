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
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


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

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [t for t in tree_flatten(self.output)[0] if isinstance(t, torch.Tensor)]

    @property
    def x(self) -> torch.Tensor:
        """The first positional argument (a layer's input)."""
        return self.args[0]

    @property
    def delta(self) -> torch.Tensor:
        """The gradient w.r.t. the (first) output; zeros when the output did not reach the loss."""
        d = self.deltas[0]
        return torch.zeros_like(self.outputs[0]) if d is None else d


def expand_shared(layer, n: int | None, args: tuple, output):
    """A call whose input holds one row of ids for the whole batch (a position embedding's ids of shape
    (1, T)): its input and output expanded to the batch's N samples, so each sample's share of the output
    gradient is kept apart. Returns ``(args, output)``, unchanged for other calls (a float input with one
    row is one sample of a subset: a multi-task head's)."""
    if layer is None or not n or n == 1 or not args or not isinstance(args[0], torch.Tensor):
        return args, output
    x = args[0]
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return args, output
    d = layer.reads(x)
    if (d is None or x.dim() <= d or x.shape[d] != 1 or not isinstance(output, torch.Tensor)
            or output.dim() <= d or output.shape[d] != 1):
        return args, output
    grow = lambda t: t.expand(*t.shape[:d], n, *t.shape[d + 1:])  # noqa: E731
    return (grow(x),) + tuple(args[1:]), grow(output)


class Recorder:
    """Forward hooks that record every call of ``modules`` (a dict of module -> list of calls).

    ``plan`` and ``n`` (a callable giving the batch's sample count once it is
    known): calls that broadcast one row to the whole batch are expanded
    (:func:`expand_shared`).
    """

    def __init__(self, modules: list[nn.Module], grads: bool, plan=None, n: Callable[[], int | None] = None):
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in modules}
        self.grads = grads
        self.plan = plan
        self.n = n
        self.handles: list = []

    def _hook(self, module, args, kwargs, output):
        new = None
        if self.plan is not None and self.n is not None:
            args, expanded = expand_shared(self.plan.reader(module), self.n(), args, output)
            if expanded is not output:
                output = new = expanded
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        call = Call(args, kwargs, output, [None] * len(outs), [t._version for t in outs])
        replay = self._pending.pop(module, None)
        if replay is not None:
            call.replay, call.targets = replay, replay.targets()
        if self.grads:
            for i, t in enumerate(outs):
                if t.requires_grad:
                    t.register_hook(_store(call.deltas, i))
        self.calls[module].append(call)
        return new

    def __enter__(self) -> "Recorder":
        self._pending: dict = {}
        self._forwards: list = []
        for m in self.calls:
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
            layer = self.plan.reader(m) if self.plan is not None and self.grads else None
            if layer is not None and hasattr(layer.rule, "inline_forward"):
                self._inline(m, layer)
        return self

    def _inline(self, module: nn.Module, layer) -> None:
        """Run ``layer.rule.inline_forward`` as the module's forward during the recorded pass."""
        had = "forward" in module.__dict__
        self._forwards.append((module, had, module.__dict__.get("forward")))

        def forward(*args, **kwargs):
            out, replay = layer.rule.inline_forward(layer, args, kwargs)
            self._pending[module] = replay
            return out

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


def _store(slots: list, i: int) -> Callable:
    def hook(grad):
        slots[i] = grad
    return hook


@contextlib.contextmanager
def capture(modules: list[nn.Module], grads: bool = True, plan=None, n=None) -> Iterator[Recorder]:
    """Record the calls of ``modules`` during the block (with output gradients when ``grads``)."""
    with Recorder(modules, grads, plan, n) as rec:
        yield rec


def backward(loss: torch.Tensor, rec: Recorder, retain_graph: bool = False) -> None:
    """One backward pass of ``loss`` that fills the recorded calls' ``deltas``, writing no ``.grad``."""
    targets: dict[int, torch.Tensor] = {}
    for module, calls in rec.calls.items():
        for call in calls:
            for t in call.targets:
                targets[id(t)] = t
            ins = [t for t in tree_flatten((call.args, call.kwargs))[0]
                   if isinstance(t, torch.Tensor) and t.requires_grad]
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
        torch.autograd.grad(loss, list(targets.values()), allow_unused=True, retain_graph=retain_graph)
