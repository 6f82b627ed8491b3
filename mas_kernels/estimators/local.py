r"""The local (Hebbian) rule: importance from a layer's own input and output, forward only.

Each layer's rule (``rules``) adds ``sum |y| |x|^T`` in its own form:
Linear and transformers' Conv1D ``|y|^T |x|`` over every row (positions of
a sample included); ConvNd the same over positions (a convolution
weight-gradient with ``|x|`` and ``|y|``); Embedding ``|y|`` of each position
added to its token's row; norms ``|y * x_hat|`` (weight) and ``|y|`` (bias);
biases ``sum |y|``. A parameter used by several layers (tied weights) adds
the numerators of every use. Numerators only: the wrapper divides by N at
``consolidate()``. MultiheadAttention: each projection as a Linear (the
attention output recomputed from its own projections); RNNs: ``|zi_t| |x_t|^T``
and ``|zh_t| |h_{t-1}|^T`` over every step. Layers without a local rule (those
only the generic module-local rule serves) leave their parameters
*uncovered*, for the wrapper's ``uncovered=`` policy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map

from .._model import own_hook
from .capture import Call, expand_shared
from .plan import Layer, Plan


class LocalRule:
    """Forward hooks that add each layer's Hebbian numerators into the staging buffers.

    Args:
        plan: the layers and what they cover.
        post_activation: applied to each layer's output before the rule: one
            callable for every layer, or ``{module_name: callable}``.
    """

    def __init__(self, plan: Plan, post_activation: Callable | dict | None = None):
        self.plan = plan
        self.post_activation = post_activation

    def _activation(self, name: str) -> Callable | None:
        pa = self.post_activation
        return pa.get(name) if isinstance(pa, dict) else pa

    def layers(self) -> list[Layer]:
        return [layer for layer in self.plan.layers if layer.rule.local_supported]

    def hooks(self, staging: Callable, active: Callable[[], bool], n: Callable[[], int | None] = lambda: None) -> list:
        """Register one forward hook per layer; each does nothing unless ``active()``.

        ``staging()``: the staging buffers the numerators go into (asked per call: the state may
        reallocate them).

        ``n()``: the batch's sample count, for layers that read one row for the
        whole batch (a position embedding), whose numerators count once per sample.
        """
        return [layer.module.register_forward_hook(own_hook(layer.module, self._hook(layer, staging, active, n)),
                                                   with_kwargs=True)
                for layer in self.layers()]

    def _hook(self, layer: Layer, staging, active: Callable[[], bool], n: Callable[[], int | None]):
        act = self._activation(layer.name)

        def hook(module, args, kwargs, output):
            if not active() or not (args or kwargs):
                return
            if isinstance(output, torch.Tensor):
                y = output.detach()
                if act is not None:
                    y = act(y)
            else:  # RNNs, MultiheadAttention: (output, state) tuples
                y = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)
            args, y = expand_shared(layer, n(), tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                      for a in args), y)
            call = Call(args, kwargs, y, [None], [0])
            stage = staging()
            with stage.scope([layer], layer.attrs.values()):
                layer.rule.local(layer, call, {a: stage[n] for a, n in layer.attrs.items()})

        return hook
