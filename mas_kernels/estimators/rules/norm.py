r"""Normalization layers: LayerNorm, GroupNorm, BatchNorm (running statistics), RMSNorm.

Each computes ``y = x_hat * w + b`` with ``x_hat`` the normalized input, so
per sample k: ``g_w = sum_positions delta_k * x_hat_k``, ``g_b = sum_positions
delta_k`` (positions: every dim that is not a parameter dim). ``x_hat`` is
recomputed in fp32 from the recorded input, exactly as the layer computes it.
Local (the convention here): ``sum |y * x_hat|`` for the weight (the weight's
input is ``x_hat``), ``sum |y|`` for the bias.

BatchNorm normalizes with batch statistics in train mode (and always
without running statistics): the samples of a batch are then coupled, and
a per-sample gradient of ``||F(x_k)||^2`` is not defined by the batch alone;
the exact rule refuses it by name before the forward pass (estimate in eval
mode, or use ``importance='global_batch'``).
"""

from __future__ import annotations

import abc

import torch

from ... import _backend, _native
from .base import Rule, batched, sample_dim


class _Norm(Rule, abc.ABC):
    """Shared by the norms: subclasses say how ``x_hat`` is computed and how a tensor reduces to a parameter."""

    @abc.abstractmethod
    def x_hat(self, module, x: torch.Tensor) -> torch.Tensor:
        """The normalized input, fp32, shaped like x."""

    @abc.abstractmethod
    def per_sample_sum(self, layer, ctx, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the input ``x``) summed over each sample's positions: (N, *param.shape)."""

    @abc.abstractmethod
    def total_sum(self, module, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over samples and positions: the parameter's shape."""

    def _per_sample(self, layer, calls, ctx, attrs):
        """Per-sample gradients of every sample (they are small: parameter-sized vectors)."""
        module = layer.module
        out = {a: torch.zeros((ctx.n, *getattr(module, a).shape), device=getattr(module, a).device)
               for a in attrs}
        for call in calls:
            if call.deltas[0] is None:
                continue
            x = call.x.detach()
            d = call.delta.float()
            if "weight" in out:
                out["weight"] += self.per_sample_sum(layer, ctx, x, d * self.x_hat(module, x.float()))
            if "bias" in out:
                out["bias"] += self.per_sample_sum(layer, ctx, x, d)
        return out

    def exact(self, layer, calls, ctx, accs):
        grads = self._per_sample(layer, calls, ctx, list(accs))
        for a, acc in accs.items():
            acc.add_(grads[a].abs().sum(0))

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        return {a: g[lo:hi] for a, g in self._per_sample(layer, calls, ctx, attrs).items()}

    def local(self, layer, call, accs):
        module = layer.module
        x = call.x.detach()
        y = call.outputs[0].detach().float().abs()
        if "weight" in accs:
            accs["weight"].add_(self.total_sum(module, y * self.x_hat(module, x.float()).abs()))
        if "bias" in accs:
            accs["bias"].add_(self.total_sum(module, y))


class LayerNormRule(_Norm):
    """``nn.LayerNorm``: weight and bias of ``normalized_shape``."""

    def reads(self, layer, x):
        return None if x.dim() == len(layer.module.normalized_shape) else super().reads(layer, x)

    def feature_dims(self, layer, x):
        return len(layer.module.normalized_shape)

    rms = False

    def x_hat(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)

    def _eps(self, module) -> float:
        return module.eps

    def _per_sample(self, layer, calls, ctx, attrs):
        """On CPU with the native kernels: per sample ``sum_t d * x_hat`` and ``sum_t d`` in one pass over x and d
        (``csrc/norm_sums.cpp``, the row statistics recomputed there); the PyTorch path elsewhere."""
        module = layer.module
        fast = [c for c in calls if c.deltas[0] is not None]
        if not fast or any(c.x.device.type != "cpu" or _backend.choose(c.x.device) != "native"
                           or c.x.dtype == torch.float64 or c.delta.dtype != c.x.dtype for c in fast):
            return super()._per_sample(layer, calls, ctx, attrs)
        k = len(module.normalized_shape)
        out = {a: torch.zeros((ctx.n, *getattr(module, a).shape), device=getattr(module, a).device)
               for a in attrs}
        for call in fast:
            x = call.x.detach()
            dim = sample_dim(x, ctx, k, layer)
            xb = batched(x, ctx.n, k, dim)
            db = batched(call.delta, ctx.n, k, dim)
            n, t = xb.shape[:2]
            sums = _native.lib().layer_norm_sums(xb.reshape(n, t, -1).contiguous(), db.reshape(n, t, -1).contiguous(),
                                                 self._eps(module), self.rms)
            if "weight" in out:
                out["weight"] += sums[:, 0].view(n, *module.normalized_shape)
            if "bias" in out:
                out["bias"] += sums[:, 1].view(n, *module.normalized_shape)
        return out

    def per_sample_sum(self, layer, ctx, x, t):
        k = len(layer.module.normalized_shape)
        return batched(t, ctx.n, k, sample_dim(x, ctx, k, layer)).sum(1)

    def total_sum(self, module, t):
        return t.reshape(-1, *module.normalized_shape).sum(0)


class RMSNormRule(LayerNormRule):
    """``nn.RMSNorm``: a weight of ``normalized_shape`` (no bias)."""

    attrs = ("weight",)
    rms = True

    def _eps(self, module) -> float:
        return module.eps if module.eps is not None else torch.finfo(torch.float32).eps  # as x_hat on x.float()

    def x_hat(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


class _ChannelNorm(_Norm):
    """Norms with one weight per channel (dim 1 of an (N, C, *) input)."""

    def feature_dims(self, layer, x):
        return x.dim() - 1

    def per_sample_sum(self, layer, ctx, x, t):
        if x.shape[0] != ctx.n:
            raise ValueError(f"MAS: layer {layer.name!r} got an input of shape {tuple(x.shape)} in a batch of "
                             f"{ctx.n} samples; its samples must be dim 0")
        return t.sum(list(range(2, t.dim()))) if t.dim() > 2 else t

    def total_sum(self, module, t):
        return t.sum([d for d in range(t.dim()) if d != 1])


class GroupNormRule(_ChannelNorm):
    """``nn.GroupNorm``: weight and bias per channel; statistics per (sample, group)."""

    def x_hat(self, module, x):
        shape = x.shape
        g = x.reshape(shape[0], module.num_groups, -1)
        var, mean = torch.var_mean(g, dim=2, unbiased=False, keepdim=True)
        return ((g - mean) * torch.rsqrt(var + module.eps)).reshape(shape)


class BatchNormRule(_ChannelNorm):
    """``nn.BatchNorm1d/2d/3d`` with running statistics (eval mode)."""

    @staticmethod
    def uses_batch_stats(module) -> bool:
        return module.training or module.running_mean is None

    def check(self, layer) -> None:
        if self.uses_batch_stats(layer.module):
            why = "train mode" if layer.module.training else "track_running_stats=False"
            raise ValueError(
                f"MAS(importance='global'): BatchNorm layer {layer.name!r} normalizes with batch statistics "
                f"({why}), which couples the samples of a batch, so a per-sample gradient is not defined; "
                "estimate in eval mode (estimate(..., train_mode=False), the default; running statistics) or "
                "use importance='global_batch'"
            )

    def _per_sample(self, layer, calls, ctx, attrs):
        """Running statistics on CPU with the native kernels: per sample and channel ``sum_l d (x - mean)`` and
        ``sum_l d`` in one pass over x and d (``csrc/norm_sums.cpp``), then ``g_w = invstd * sum_l d (x - mean)``;
        the PyTorch path (x_hat, its product with d, two sums) elsewhere."""
        module = layer.module
        fast = [c for c in calls if c.deltas[0] is not None]
        if (self.uses_batch_stats(module) or not fast or any(
                c.x.device.type != "cpu" or _backend.choose(c.x.device) != "native" or c.x.dtype == torch.float64
                or c.x.shape[0] != ctx.n or c.x.dim() < 2 or c.delta.dtype != c.x.dtype for c in fast)):
            return super()._per_sample(layer, calls, ctx, attrs)
        mean = module.running_mean.float().contiguous()
        invstd = torch.rsqrt(module.running_var.float() + module.eps)
        sums = None
        for call in fast:
            x, d = call.x.detach(), call.delta
            s = _native.lib().channel_sums(x.reshape(ctx.n, x.shape[1], -1).contiguous(),
                                           d.reshape(ctx.n, x.shape[1], -1).contiguous(), mean)
            sums = s if sums is None else sums.add_(s)
        out = {}
        if "weight" in attrs:
            out["weight"] = sums[..., 0].mul_(invstd)
        if "bias" in attrs:
            out["bias"] = sums[..., 1]
        return out

    def x_hat(self, module, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.uses_batch_stats(module):  # what the layer normalized with (the local rule in train mode)
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        else:
            mean = module.running_mean.float().view(shape)
            var = module.running_var.float().view(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)
