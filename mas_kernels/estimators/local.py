r"""The local (Hebbian) rule: importance from a layer's own input and output, forward only.

Each layer's rule (``rules``) adds ``sum |y| |x|^T`` in its own form:
Linear and transformers' Conv1D ``|y|^T |x|`` over every row (positions of
a sample included); ConvNd the same over positions (a convolution
weight-gradient with ``|x|`` and ``|y|``); Embedding ``|y|`` of each position
added to its token's row; norms ``|y * x_hat|`` (weight) and ``|y|`` (bias);
biases ``sum |y|``. A parameter used by several layers (tied weights) adds
the numerators of every use. Numerators only: the wrapper divides by N at
``consolidate()``. A call that serves the whole batch at once (a position
embedding of ids ``(1, T)``, T5's relative-position buckets: observed by the
probe, ``layout.py``) counts once per sample: its numerators times N.
MultiheadAttention: each projection as a Linear (the attention output
recomputed from its own projections); RNNs: ``|zi_t| |x_t|^T`` and ``|zh_t|
|h_{t-1}|^T`` over every step. Layers without a local rule (those only the
generic module-local rule serves) leave their parameters *uncovered*, for the
wrapper's ``uncovered=`` policy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map

from .._model import own_hook
from .capture import Call
from .plan import Layer, Plan


class LocalEstimator:
    """Forward hooks that add each layer's Hebbian numerators into the staging buffers.

    Args:
        plan: the layers and what they cover.
        post_activation: applied to each layer's output before the rule: one
            callable for every layer, or ``{module_name: callable}``.
    """

    def __init__(self, plan: Plan, post_activation: Callable | dict | None = None):
        self.plan = plan
        self.post_activation = post_activation
        self._index: dict[int, int] = {}  # module id -> calls seen in this forward
        self._batch = None  # the forward's batch (its layout and N)

    def _activation(self, name: str) -> Callable | None:
        pa = self.post_activation
        return pa.get(name) if isinstance(pa, dict) else pa

    def layers(self) -> list[Layer]:
        return [layer for layer in self.plan.layers if layer.rule.local_supported]

    def begin(self, batch) -> None:
        """A forward of the model starts: ``batch`` has its observed layout and N."""
        self._index.clear()
        self._batch = batch

    def hooks(self, staging: Callable, active: Callable[[], bool]) -> list:
        """Register one forward hook per layer module; each does nothing unless ``active()``.

        ``staging()``: the staging buffers the numerators go into (asked per call: the state may
        reallocate them).
        """
        by_module: dict[int, list[Layer]] = {}
        for layer in self.layers():
            by_module.setdefault(id(layer.module), []).append(layer)
        return [layers[0].module.register_forward_hook(
                    own_hook(layers[0].module, self._hook(layers, staging, active)), with_kwargs=True)
                for layers in by_module.values()]

    def _hook(self, layers: list[Layer], staging, active: Callable[[], bool]):
        acts = [self._activation(layer.name) for layer in layers]

        def hook(module, args, kwargs, output):
            if not active() or not (args or kwargs) or self._batch is None:
                return
            i = self._index.get(id(module), 0)
            self._index[id(module)] = i + 1
            batch = self._batch
            dims = batch.layout.dims_of(module, i)
            n = batch.n
            # A call every sample shares counts once per sample (not once per batch); one the exact rule's
            # recorded pass broadcasts (``expand``) is shared here, in the user's own forward.
            shared = dims is not None and (dims.shared or dims.expand is not None)
            times = n if shared and n > 1 and not batch.layout.single else 1
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            stage = staging()
            for layer, act in zip(layers, acts):
                if isinstance(output, torch.Tensor):
                    y = output.detach()
                    if act is not None:
                        y = act(y)
                else:  # RNNs, MultiheadAttention: (output, state) tuples
                    y = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)
                call = Call(args, kwargs, y, [None], [], dims=dims)
                with stage.scope([layer], layer.attrs.values()):  # a sharded state reduce-scatters after
                    accs = {a: stage[name] for a, name in layer.attrs.items()}
                    if times == 1:
                        layer.rule.local(layer, call, accs)
                        continue
                    tmp = {a: torch.zeros_like(acc) for a, acc in accs.items()}
                    layer.rule.local(layer, call, tmp)
                    for a, acc in accs.items():
                        acc.add_(tmp[a], alpha=times)

        return hook
