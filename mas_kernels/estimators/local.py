r"""The local (Hebbian) rule: importance from a layer's own input and output, forward only.

Linear, input x, output y (rows of extra dims are positions of one sample):
``Omega_W += sum_k |y_k| |x_k|^T``, ``Omega_b += sum_k |y_k|``: one
``abs_outer_accumulate_(acc, Y, X)``. ConvNd: the same over positions, i.e.
the weight-gradient of a convolution with input ``|x|`` and output-gradient
``|y|`` (the layer's padding applied to ``|x|`` first, so every padding mode
is exact). Numerators only: the wrapper divides by N at ``consolidate()``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import abs_outer_accumulate_
from .plan import Layer, Plan

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def local_linear(acc_w: torch.Tensor, acc_b: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    abs_outer_accumulate_(acc_w, y2, x2)
    if acc_b is not None:
        acc_b.add_(y2.abs().sum(0, dtype=torch.float32))


def local_conv(module: nn.Module, acc_w: torch.Tensor, acc_b: torch.Tensor | None,
               x: torch.Tensor, y: torch.Tensor) -> None:
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    xa = x.detach().abs().float()
    ya = y.detach().abs().float()
    # Pad |x| exactly as the layer padded x (|pad(x)| = pad(|x|) for every mode),
    # then take the weight-gradient without padding.
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        if module.padding_mode == "zeros":
            xa = F.pad(xa, pads)
        else:
            xa = F.pad(xa, pads, mode=module.padding_mode)
    acc_w.add_(_CONV_WEIGHT[nd](xa, module.weight.shape, ya, module.stride, 0, module.dilation, module.groups))
    if acc_b is not None:
        acc_b.add_(ya.sum(dim=[d for d in range(ya.dim()) if d != 1]))


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

    def hooks(self, staging, active: Callable[[], bool]) -> list:
        """Register one forward hook per layer; each does nothing unless ``active()``."""
        return [layer.module.register_forward_hook(self._hook(layer, staging, active)) for layer in self.plan.layers]

    def _hook(self, layer: Layer, staging, active: Callable[[], bool]):
        act = self._activation(layer.name)
        w, b = layer.weight, layer.bias

        def hook(module, args, output):
            if not active() or not args or not isinstance(output, torch.Tensor):
                return
            x = args[0].detach()
            y = output.detach()
            if act is not None:
                y = act(y)
            acc_w = staging[w] if w is not None else torch.zeros_like(module.weight, dtype=torch.float32)
            acc_b = staging[b] if b is not None else None
            if isinstance(module, nn.Linear):
                local_linear(acc_w, acc_b, x, y)
            else:
                local_conv(module, acc_w, acc_b, x, y)

        return hook
