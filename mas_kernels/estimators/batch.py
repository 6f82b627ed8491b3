"""A batch as the rules see it: one call of the model, its observed layout, its sample count N.

What a batch is: one call of the model, ``model(*args, **kwargs)`` (made by
the user's forward inside ``accumulating()``, or by ``estimate()``'s
``forward=``). Where its samples are, and N, are *observed*
(``layout.py``): once per call signature the model runs on a sub-batch of
1-3 samples, and the dim of the input along which the outputs of the sub-batch
are the batch's own is the sample dim (``sample_dim=`` says it instead). N is
that dim's size, the same for every rule. :class:`Layouts` keeps the layouts
of one estimation session by signature; :meth:`Batch.subset` is the batch
restricted to some of its samples (the self-check's sub-batch).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .layout import Layout, Prober, _substitute, signature, tensor_leaves
from .uses import UseTracker


class _Captured(BaseException):
    """Raised by the pre-hook that records the model's arguments, to stop the forward there."""


class Batch:
    """One batch: ``call(model)`` runs the model on it; ``args``/``kwargs`` are the model call's."""

    def __init__(self, module: nn.Module, call: Callable[[nn.Module], Any], args: tuple | None = None,
                 kwargs: dict | None = None):
        self.module = module
        self.call = call
        self.args, self.kwargs = args, kwargs
        self.layout: Layout | None = None
        self.n: int | None = None

    @classmethod
    def of_call(cls, module: nn.Module, args: tuple, kwargs: dict) -> "Batch":
        """The batch of a call already seen (``accumulating()``): replayed with the same arguments."""
        return cls(module, lambda m: m(*args, **kwargs), args, kwargs)

    def arguments(self) -> tuple[tuple, dict]:
        """The model call's ``(args, kwargs)``: the batch is run up to the model's call, and stopped there."""
        if self.args is None:
            def pre(m, a, kw):
                self.args, self.kwargs = a, kw
                raise _Captured

            handle = self.module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
            try:
                self.call(self.module)
            except _Captured:
                pass
            finally:
                handle.remove()
            if self.args is None:
                raise TypeError("MAS: the forward function did not call the model")
        return self.args, self.kwargs

    def forward(self) -> Any:
        """Run the model on the batch."""
        return self.call(self.module)

    def subset(self, idx: list[int]) -> "Batch":
        """This batch restricted to its samples ``idx`` (the same ``forward=``, the model's call given only
        those samples' part of each argument)."""
        args, kwargs = self.layout.subset(self.args, self.kwargs, idx)
        outer = self.call

        def call(m):
            handle = _substitute(self.module, args, kwargs)
            try:
                return outer(m)
            finally:
                handle.remove()

        sub = Batch(self.module, call, args, kwargs)
        sub.layout, sub.n = self.layout, len(idx)
        return sub


def pick_outputs(output_fn: Callable | None) -> Callable:
    """``pick(result)``: the output tensors a probe compares: ``output_fn``'s tensor (the global rules: its
    error, e.g. a model that returns a dict and no ``output_fn``, is the user's to see), else every tensor
    the model returned (the local rule needs no ``output_fn``)."""
    def pick(out):
        if output_fn is not None:
            return [output_fn(out)]
        if isinstance(out, torch.Tensor):
            return [out]
        return tensor_leaves(out)
    return pick


class Layouts:
    """The observed layouts of one estimation session, by call signature (``layout.signature``).

    Args:
        module: the model.
        plan: its layers (their calls are observed; their rules say when an input is one unbatched sample).
        params: the tracked parameters (their uses are observed).
        output_fn: picks the output tensor (or None: every tensor the model returns).
        sample_dim: the user's ``sample_dim=`` (see :class:`~.layout.Prober`).
        quiet: a context in which the probe's own forward passes run unseen by the session's hooks.
        exact: whether the exact rule will read the layout (then shared calls are tried broadcast, and
            uses are tracked).
        track: track the uses of parameters without ``exact`` (the local rule: a use outside the layer whose
            rule covers a parameter is one that rule cannot see).
        agree: for a sharded model, ``agree(flag)``: the flag AND-ed over the ranks (see ``layout.Prober``).
    """

    def __init__(self, module: nn.Module, plan, params: dict, output_fn: Callable | None, sample_dim=None,
                 quiet: Callable = contextlib.nullcontext, exact: bool = False, agree: Callable | None = None,
                 track: bool = False):
        self.module = module
        self.plan = plan
        self.params = params
        self.output_fn = output_fn
        self.sample_dim = sample_dim
        self.quiet = quiet
        self.exact = exact
        self.track = track or exact
        self.agree = agree
        self.cache: dict[tuple, Layout] = {}

    def resolve(self, batch: Batch, checked: bool = False) -> Layout | None:
        """``batch.layout`` and ``batch.n``, observed if its signature is new in this session (an empty batch:
        no layout, N = 0). ``checked``: the self-check runs on this batch next (see ``Prober``)."""
        args, kwargs = batch.arguments()
        first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
        if first is not None and first.numel() == 0:  # an empty batch: nothing to observe, nothing to count
            batch.layout, batch.n = None, 0
            return None
        key = signature(args, kwargs)
        layout = self.cache.get(key)
        if layout is None or (layout.single and layout.n(args, kwargs) > 1):
            layout = self.cache[key] = self.observe(batch, checked)
        batch.layout, batch.n = layout, layout.n(args, kwargs)
        return layout

    def forget(self, batch: Batch) -> None:
        """Drop the layout of ``batch``'s signature (the model's calls no longer match it)."""
        self.cache.pop(signature(*batch.arguments()), None)

    def observe(self, batch: Batch, checked: bool = False) -> Layout:
        from .._model import modes

        plan = self.plan
        modules = plan.modules()
        covering = {n: [layer.module for layer, _ in uses] for n, uses in plan.uses.items()}

        def api(m, x):
            layer = plan.reader(m)
            return None if layer is None else layer.rule.api_layout(layer, x)

        def tracker(inputs):
            return UseTracker(self.module, self.params, covering, inputs)

        def expandable(m):
            return any(not layer.rule.own_layout for layer in plan.layers if layer.module is m)

        prober = Prober(self.module, lambda: batch.call(self.module), pick_outputs(self.output_fn), modules,
                        self.sample_dim, api, tracker if self.track else None,
                        expandable if self.exact else None, self.agree, checked=checked and self.exact,
                        by_value=self.exact)
        with self.quiet(), modes(self.module, False), torch.no_grad():
            return prober.observe(batch.args, batch.kwargs)


def call_for(batch, forward: Callable | None, device: torch.device) -> Callable[[nn.Module], Any]:
    """How to run the model on one of ``estimate()``'s batches, moved to ``device``.

    ``forward(model, batch)`` when given; else a tensor runs ``model(batch)``,
    a tuple/list ``model(batch[0])`` (labels ignored), a dict ``model(**batch)``.
    """
    batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    if forward is not None:
        return lambda m: forward(m, batch)

    def hinted(call):
        def run(m):
            try:
                return call(m)
            except TypeError as exc:
                if "argument" not in str(exc):
                    raise
                raise TypeError(
                    f"MAS.estimate: calling the model on the batch failed ({exc}); a tuple/list batch runs "
                    "model(batch[0]) and a dict batch model(**batch). Pass forward=lambda model, batch: "
                    "model(...) to say how, e.g. forward=lambda m, b: m(b[0], b[2]) for task labels"
                ) from exc
        return run

    if isinstance(batch, torch.Tensor):
        return hinted(lambda m: m(batch))
    if isinstance(batch, dict):
        return hinted(lambda m: m(**batch))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return hinted(lambda m: m(batch[0]))
    raise TypeError(
        f"MAS.estimate: a batch is a tensor, a tuple/list whose first item is the input tensor, or a dict "
        f"of keyword arguments; got {type(batch).__name__}. Pass forward=lambda model, batch: ... to say "
        "how to run the model on it"
    )
