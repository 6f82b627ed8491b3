"""A batch as the rules see it: run the model on it, count its samples, replay one sample alone.

What a batch is, and N: one call of the model, ``model(*args, **kwargs)``;
its samples are counted along the first tensor it gets (positional or
keyword), in the dim where the first layer that reads that tensor keeps its
samples: dim 0, dim 1 for an RNN or MultiheadAttention with
``batch_first=False``; or 1 when that layer takes it as one unbatched sample
(a 1-D input of a Linear, a (C, H, W) input of a Conv2d, a 2-D input of an
RNN). A first tensor no layer reads directly counts along dim 0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor):
            return t
    return None


def same(a, b) -> bool:
    """``a`` is ``b`` or a view of the same elements (``input_ids.view(-1, T)``)."""
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                      and a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr()
                      and a.stride() == b.stride())


def count_samples(args: tuple, kwargs: dict, reader=None, who: str = "MAS") -> int:
    """N of the call ``model(*args, **kwargs)``; ``reader``: the first layer (a plan ``Layer``) that read its
    first tensor, which says where that tensor holds its samples (or that it is one unbatched sample)."""
    t = first_tensor(args, kwargs)
    if t is None:
        raise TypeError(f"{who}: the model was called without a tensor argument, so its samples cannot be "
                        "counted; pass the input as a tensor (positional or keyword)")
    if t.dim() == 0:
        return 1
    dim = reader.reads(t) if reader is not None else 0
    return 1 if dim is None else int(t.shape[dim])


class Batch:
    """One batch: ``call(model)`` runs the model on it (the first run records the model's arguments)."""

    def __init__(self, module: nn.Module, call: Callable[[nn.Module], Any], args: tuple | None = None,
                 kwargs: dict | None = None, n: int | None = None):
        self.module = module
        self.call = call
        self.args, self.kwargs = args, kwargs
        self.n = n
        self.layout: int | None = None  # the dim of the input that holds samples, as its first reader says

    @classmethod
    def of_call(cls, module: nn.Module, args: tuple, kwargs: dict, n: int, layout: int | None = None) -> "Batch":
        """The batch of a call already seen (``accumulating()``): replayed with the same arguments."""
        batch = cls(module, lambda m: m(*args, **kwargs), args, kwargs, n)
        batch.layout = layout
        return batch

    def forward(self, plan=None) -> Any:
        """Run the model on the batch; the first time, record its arguments and count its samples.

        ``plan``: its layers say how they read the input (where its samples are).
        """
        if self.args is not None:
            return self.call(self.module)
        first: list = []

        def pre(m, a, kw):
            if self.args is None:
                self.args, self.kwargs = a, kw
                self.n = count_samples(a, kw)  # dim 0, until a layer that reads the input says otherwise

        def reader(m, a):
            if not first and a and self.args is not None and same(a[0], first_tensor(self.args, self.kwargs)):
                first.append(m)
                layer = plan.reader(m)
                self.n = count_samples(self.args, self.kwargs, layer)
                t = first_tensor(self.args, self.kwargs)
                self.layout = layer.reads(t) if t is not None and t.dim() > 0 else None

        handles = [self.module.register_forward_pre_hook(pre, with_kwargs=True)]
        if plan is not None:
            handles += [m.register_forward_pre_hook(reader) for m in plan.modules()]
        try:
            out = self.call(self.module)
        finally:
            for h in handles:
                h.remove()
        if self.args is None:
            raise TypeError("MAS: the forward function did not call the model")
        return out


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
