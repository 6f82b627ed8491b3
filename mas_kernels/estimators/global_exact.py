r"""The exact global rule (the paper, Eq. 2): ``Omega = (1/N) sum_k |d ||F(x_k)||_2^2 / d theta|``.

The absolute value of each sample's gradient. For a Linear layer called once
per forward on 2-D inputs the per-sample weight gradient is ``delta_k x_k^T``
(delta = dL/dy), so its absolute value is ``|delta_k| |x_k|^T``: one
``abs_outer_accumulate_`` after one backward pass. Every other parameter gets
its exact per-sample gradient from ``torch.func`` (vmap of grad) in chunks of
samples, so memory stays bounded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..ops import abs_outer_accumulate_
from .global_batch import squared_norm
from .plan import Plan

_CHUNK_BYTES = 256 << 20  # per-sample gradients of one chunk, when chunk_size is not given


def global_linear(acc_w: torch.Tensor, acc_b: torch.Tensor | None, x: torch.Tensor, delta: torch.Tensor) -> None:
    """Exact per-sample rule for a Linear layer on 2-D input: |delta_k| |x_k|^T summed."""
    abs_outer_accumulate_(acc_w, delta, x)
    if acc_b is not None:
        acc_b.add_(delta.abs().sum(0, dtype=torch.float32))


def per_sample_exact(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, output_fn: Callable,
                     accs: dict[str, torch.Tensor], chunk_size: int) -> None:
    """Add ``sum_k |d ||F(x_k)||^2 / d theta|`` for the parameters in ``params``.

    Per-sample gradients come from ``torch.func.vmap(grad(...))`` over chunks
    of ``chunk_size`` samples; parameters not in ``params`` are constants.
    """
    from torch.func import functional_call, grad, vmap

    detached = {name: p.detach() for name, p in params.items()}

    def one_sample(ps, xk):
        out = functional_call(module, ps, (xk.unsqueeze(0),), strict=False)
        return squared_norm(output_fn(out))

    per_sample_grad = vmap(grad(one_sample), in_dims=(None, 0), randomness="different")
    for start in range(0, x.shape[0], chunk_size):
        grads = per_sample_grad(detached, x[start:start + chunk_size])
        with torch.no_grad():
            for name, g in grads.items():
                accs[name].add_(g.abs().sum(0, dtype=torch.float32))


class ExactRule:
    """Exact per-sample importance of chosen parameters for one batch, into the staging buffers.

    Args:
        module: the model.
        params: the tracked parameters.
        plan: its layers (the Linear fast path applies to the Linear layers there).
        output_fn: picks the output tensor.
        chunk_size: samples per chunk of per-sample gradients (``None``: ~256 MiB of them).
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], plan: Plan, output_fn: Callable,
                 chunk_size: int | None = None):
        self.module = module
        self.params = params
        self.plan = plan
        self.output_fn = output_fn
        self.chunk_size = chunk_size

    def _chunk(self, names: list[str]) -> int:
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        per_sample = 4 * sum(self.params[n].numel() for n in names) or 1
        return max(1, _CHUNK_BYTES // per_sample)

    def run(self, x: torch.Tensor, staging, names: list[str] | None = None) -> None:
        """Add the batch's numerators of ``names`` (default: every tracked parameter) into ``staging``."""
        names = list(self.params) if names is None else names
        wanted = set(names)
        fast = {}  # layer -> the (input, output) of each call
        handles = []
        for layer in self.plan.layers:
            if isinstance(layer.module, nn.Linear) and wanted & set(layer.names()):
                calls: list = []
                fast[layer] = calls
                handles.append(layer.module.register_forward_hook(
                    lambda mod, args, out, calls=calls: calls.append((args[0], out))))
        covered = {n for layer in fast for n in layer.names() if n in wanted}
        generic = [n for n in names if n not in covered]
        if fast:
            try:
                with torch.enable_grad():
                    loss = squared_norm(self.output_fn(self.module(x)))
            finally:
                for h in handles:
                    h.remove()
            usable = {layer: calls for layer, calls in fast.items()
                      if len(calls) == 1 and calls[0][0].dim() == 2 and calls[0][1].requires_grad}
            for layer, calls in fast.items():
                # Called several times, on N-D input, or off the output's path: per-sample rule.
                # (Never called: no gradient, so nothing to add.)
                if layer not in usable and calls:
                    generic += [n for n in layer.names() if n in wanted]
            if usable:
                ys = [calls[0][1] for calls in usable.values()]
                deltas = torch.autograd.grad(loss, ys, allow_unused=True, materialize_grads=True)
                for (layer, calls), delta in zip(usable.items(), deltas):
                    w = layer.weight if layer.weight in wanted else None
                    b = layer.bias if layer.bias in wanted else None
                    acc_w = staging[w] if w is not None else torch.zeros_like(layer.module.weight,
                                                                                dtype=torch.float32)
                    global_linear(acc_w, staging[b] if b is not None else None, calls[0][0].detach(), delta)
            del loss
        if generic:
            per_sample_exact(self.module, {n: self.params[n] for n in generic}, x, self.output_fn,
                             {n: staging[n] for n in generic}, self._chunk(generic))
