r"""The importance estimators: which tensors feed which op, per layer type.

All rules add *numerators* (sums over samples) into fp32 accumulators; the
wrapper divides by N, the number of samples, at ``consolidate()``. Positions
of extra dims (sequence, spatial) are summed within a sample.

local / Hebbian (no backward pass)
    Linear, input x, output y:  ``Omega_W += sum_k |y_k| |x_k|^T``,
    ``Omega_b += sum_k |y_k|``  ->  one ``abs_outer_accumulate_(acc, Y, X)``.
    ConvNd: the same over positions, i.e. the weight-gradient of a convolution
    with input ``|x|`` and output-gradient ``|y|`` (padding applied to ``x``
    first, so every padding mode is exact).

global, exact (the paper, Eq. 2)
    ``Omega = (1/N) sum_k |d ||F(x_k)||_2^2 / d theta|``, the absolute value of
    each sample's gradient. For a Linear layer called once per forward on 2-D
    inputs the per-sample weight gradient is ``delta_k x_k^T`` (delta = dL/dy),
    so its absolute value is ``|delta_k| |x_k|^T``: one ``abs_outer_accumulate_``
    after one backward pass. Every other parameter (conv, N-D Linear, norms,
    embeddings, tied weights, modules called several times) gets its exact
    per-sample gradient from ``torch.func`` (vmap of grad), in chunks of
    samples so memory stays bounded.

global_batch (the paper's released code, Avalanche)
    ``(1/N) sum_b |sum_{k in b} g_k|``: the absolute value of each batch's
    gradient, one ``abs_accumulate_`` over all parameters per batch. It
    under-estimates the exact form, more so as batches grow.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops import abs_accumulate_, abs_outer_accumulate_

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LOCAL_TYPES = (nn.Linear,) + CONV_TYPES
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def squared_norm(out: torch.Tensor) -> torch.Tensor:
    """``sum_k ||F(x_k)||_2^2`` over the batch, in fp32."""
    return out.float().pow(2).sum()


# ------------------------------------------------------------------ local rules
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


# ----------------------------------------------------------------- global rules
def global_linear(acc_w: torch.Tensor, acc_b: torch.Tensor | None, x: torch.Tensor, delta: torch.Tensor) -> None:
    """Exact per-sample rule for a Linear layer on 2-D input: |delta_k| |x_k|^T summed."""
    abs_outer_accumulate_(acc_w, delta, x)
    if acc_b is not None:
        acc_b.add_(delta.abs().sum(0, dtype=torch.float32))


def per_sample_exact(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    output_fn: Callable,
    accs: dict[str, torch.Tensor],
    chunk_size: int,
) -> None:
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


def batch_abs_grad(
    module: nn.Module,
    params: list[torch.Tensor],
    x: torch.Tensor,
    output_fn: Callable,
    accs: list[torch.Tensor],
) -> None:
    """Add ``|d sum_{k in batch} ||F(x_k)||^2 / d theta|`` (one batch-level gradient)."""
    with torch.enable_grad():  # also inside a user's torch.no_grad() (accumulating)
        loss = squared_norm(output_fn(module(x)))
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    abs_accumulate_(accs, list(grads))
