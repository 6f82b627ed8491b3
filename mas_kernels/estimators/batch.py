"""A batch as the rules see it: run the model on it, count its samples, replay one sample alone.

What a batch is, and N: one call of the model, ``model(*args, **kwargs)``;
its samples are counted along dim 0 of the first tensor it gets (positional
or keyword), unless the first layer that reads that tensor takes it as one
unbatched sample (a 1-D input of a Linear, a (C, H, W) input of a Conv2d, a
2-D input of an RNN or MultiheadAttention), which counts 1.
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


def unbatched_input(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` takes ``x`` as one sample without a batch dim."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return x.dim() == 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return x.dim() == len(module.kernel_size) + 1
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return x.dim() == 2
    if isinstance(module, nn.LayerNorm):
        return x.dim() == len(module.normalized_shape)
    return False


def count_samples(args: tuple, kwargs: dict, first_reader: nn.Module | None = None, who: str = "MAS") -> int:
    """N of the call ``model(*args, **kwargs)``; ``first_reader``: the first layer that read its first tensor."""
    t = first_tensor(args, kwargs)
    if t is None:
        raise TypeError(f"{who}: the model was called without a tensor argument, so its samples cannot be "
                        "counted; pass the input as a tensor (positional or keyword)")
    if t.dim() == 0 or (first_reader is not None and unbatched_input(first_reader, t)):
        return 1
    return int(t.shape[0])


class Batch:
    """One batch: ``call(model)`` runs the model on it (the first run records the model's arguments)."""

    def __init__(self, module: nn.Module, call: Callable[[nn.Module], Any], args: tuple | None = None,
                 kwargs: dict | None = None, n: int | None = None):
        self.module = module
        self.call = call
        self.args, self.kwargs = args, kwargs
        self.n = n

    @classmethod
    def of_call(cls, module: nn.Module, args: tuple, kwargs: dict, n: int) -> "Batch":
        """The batch of a call already seen (``accumulating()``): replayed with the same arguments."""
        return cls(module, lambda m: m(*args, **kwargs), args, kwargs, n)

    def forward(self, readers: list[nn.Module] = ()) -> Any:
        """Run the model on the batch; the first time, record its arguments and count its samples.

        ``readers``: layers whose first call may show the input is one unbatched sample.
        """
        if self.args is not None:
            return self.call(self.module)
        first: list = []

        def pre(m, a, kw):
            if self.args is None:
                self.args, self.kwargs = a, kw

        def reader(m, a):
            if not first and a and self.args is not None and a[0] is first_tensor(self.args, self.kwargs):
                first.append(m)

        handles = [self.module.register_forward_pre_hook(pre, with_kwargs=True)]
        handles += [m.register_forward_pre_hook(reader) for m in readers]
        try:
            out = self.call(self.module)
        finally:
            for h in handles:
                h.remove()
        if self.args is None:
            raise TypeError("MAS: the forward function did not call the model")
        self.n = count_samples(self.args, self.kwargs, first[0] if first else None)
        return out

    def forward_one(self, fn: Callable, k: int) -> Any:
        """``fn(*args_k, **kwargs_k)``: the call with sample k alone (a batch of one) in every batched tensor."""
        n = self.n
        a, kw = tree_map(lambda t: t[k:k + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n
                         else t, (self.args, self.kwargs))
        return fn(*a, **kw)
