r"""The batch-level global rule of the paper's released code.

``(1/N) sum_b |sum_{k in b} g_k|``: the absolute value of each batch's
gradient of ``sum_k ||F(x_k)||^2``, one ``abs_accumulate_`` over all
parameters per batch. It under-estimates the exact form, more so as batches
grow (``|sum g_k| <= sum |g_k|``). N counts where the input keeps its samples,
as observed (``layout.py``), like the other rules.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..ops import abs_accumulate_
from .capture import grad
from .global_exact import squared_norm


class BatchEstimator:
    """One batch-level gradient per batch, its absolute value added into the staging buffers."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], plan, output_fn: Callable):
        self.module = module
        self.params = params
        self.plan = plan
        self.output_fn = output_fn

    def check(self) -> None:
        """Nothing to refuse: the batch gradient is defined for every model."""

    def run(self, batch, staging, names=None) -> None:
        names = list(self.params)
        if not names:
            return
        with torch.enable_grad():  # also inside a user's torch.no_grad() (accumulating)
            loss = squared_norm(self.output_fn(batch.forward()))
            grads = grad(loss, [self.params[k] for k in names], allow_unused=True, materialize_grads=True)
        targets = [staging[k] for k in names]
        if all(t.dtype == torch.float32 for t in targets):
            abs_accumulate_(targets, list(grads))
        else:
            with torch.no_grad():
                for t, g in zip(targets, grads):
                    t.add_(g.to(t.dtype).abs())
