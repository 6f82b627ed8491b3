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
from torch import nn

from ... import _backend, _native
from ..layout import batched
from .base import Rule, native_fits, native_lib, native_sums, work_dtype
from .generic import GenericRule


class _Norm(Rule, abc.ABC):
    """Shared by the norms: subclasses say how ``x_hat`` is computed and how a tensor reduces to a parameter."""

    @abc.abstractmethod
    def x_hat(self, module, x: torch.Tensor) -> torch.Tensor:
        """The normalized input, fp32, shaped like x."""

    @abc.abstractmethod
    def per_sample_sum(self, layer, ctx, x: torch.Tensor, t: torch.Tensor, d) -> torch.Tensor:
        """``t`` (shaped like the input ``x``, which keeps its samples in ``d``) summed over each sample's
        positions: (N, *param.shape)."""

    @abc.abstractmethod
    def total_sum(self, module, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over samples and positions: the parameter's shape."""

    def _per_sample(self, layer, calls, ctx, attrs):
        """Per-sample gradients of every sample (they are small: parameter-sized vectors)."""
        module = layer.module
        dt = work_dtype(*(getattr(module, a) for a in attrs))
        out = {a: torch.zeros((ctx.n, *getattr(module, a).shape), device=getattr(module, a).device, dtype=dt)
               for a in attrs}
        for call in calls:
            if call.deltas[0] is None:
                continue
            x = call.x.detach()
            d = call.delta.to(dt)
            where = call.dims.x
            if "weight" in out:
                out["weight"] += self.per_sample_sum(layer, ctx, x, d * self.x_hat(module, x.to(dt)), where)
            if "bias" in out:
                out["bias"] += self.per_sample_sum(layer, ctx, x, d, where)
        return out

    def exact(self, layer, calls, ctx, accs):
        grads = self._per_sample(layer, calls, ctx, list(accs))
        for a, acc in accs.items():
            ctx.reduce.dense_(acc, grads[a])

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        return {a: g[lo:hi] for a, g in self._per_sample(layer, calls, ctx, attrs).items()}

    def local(self, layer, call, accs):
        module = layer.module
        x = call.x.detach()
        dt = next(iter(accs.values())).dtype
        y = call.outputs[0].detach().to(dt).abs()
        if "weight" in accs:
            accs["weight"].add_(self.total_sum(module, y * self.x_hat(module, x.to(dt)).abs()))
        if "bias" in accs:
            accs["bias"].add_(self.total_sum(module, y))


class LayerNormRule(_Norm):
    """``nn.LayerNorm``: weight and bias of ``normalized_shape``."""

    def unbatched(self, layer, x):
        return x.dim() == len(layer.module.normalized_shape)

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
               for a in attrs} if len(fast) > 1 else {}
        for call in fast:
            x = call.x.detach()
            xb = batched(x, ctx.n, k, call.dims.x)
            db = batched(call.delta, ctx.n, k, call.dims.out)
            n, t = xb.shape[:2]
            sums = _native.lib().layer_norm_sums(xb.reshape(n, t, -1).contiguous(), db.reshape(n, t, -1).contiguous(),
                                                 self._eps(module), self.rms)
            if len(fast) == 1:  # one call (the usual): its sums are the per-sample gradients
                return {a: sums[:, 0 if a == "weight" else 1].view(n, *module.normalized_shape) for a in attrs}
            if "weight" in out:
                out["weight"] += sums[:, 0].view(n, *module.normalized_shape)
            if "bias" in out:
                out["bias"] += sums[:, 1].view(n, *module.normalized_shape)
        return out

    def exact(self, layer, calls, ctx, accs):
        """One call (the usual), natively: the per-sample sums, their abs and the sum over samples in one call."""
        fast = [c for c in calls if c.deltas[0] is not None]
        if len(fast) == 1:
            call = fast[0]
            x, d = call.x.detach(), call.delta
            lib = native_sums(ctx, accs.values(), (x,)) if x.dtype == d.dtype else None
            if lib is not None:
                module = layer.module
                k = len(module.normalized_shape)
                xb, db = batched(x, ctx.n, k, call.dims.x), batched(d, ctx.n, k, call.dims.out)
                n, t = xb.shape[:2]
                lib.layer_norm_abs_sums_(accs.get("weight"), accs.get("bias"), xb.reshape(n, t, -1).contiguous(),
                                         db.reshape(n, t, -1).contiguous(), self._eps(module), self.rms)
                return
        super().exact(layer, calls, ctx, accs)

    def per_sample_sum(self, layer, ctx, x, t, d):
        k = len(layer.module.normalized_shape)
        return batched(t, ctx.n, k, d).sum(1)

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

    eager = True

    def feature_dims(self, layer, x):
        return x.dim() - 1

    def accepts(self, layer, dims):
        return dims.known and dims.x in (0, None)

    def per_sample_sum(self, layer, ctx, x, t, d):
        # (N, C, *) always (these layers take no unbatched input): a batch of one is dim 0 of size 1 too.
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

    def exact(self, layer, calls, ctx, accs):
        """One call with running statistics (the usual), natively: the per-sample sums, the scale by invstd,
        their abs and the sum over samples in one call (``channel_abs_sums_``): in a CNN's backward, where the
        rule runs with cold caches, its handful of small ops per layer cost twice the sums themselves."""
        if len(calls) == 1:
            call = calls[0]
            d = call.deltas[0]
            if d is None:
                return  # its output did not reach the loss: every g_k is 0
            module = layer.module
            mean, var = module._buffers.get("running_mean"), module._buffers.get("running_var")
            x = call.args[0]
            if (mean is not None and var is not None and not module.training and var.dtype == torch.float32
                    and x.dtype == d.dtype and x.dim() >= 2 and x.shape[0] == ctx.n and d.shape == x.shape):
                lib = native_lib(ctx)
                if lib is not None and hasattr(lib, "channel_abs_sums_") and native_fits(accs.values(), (x,)):
                    lib.channel_abs_sums_(accs.get("weight"), accs.get("bias"), x, d, mean, var, module.eps)
                    return
        super().exact(layer, calls, ctx, accs)

    def x_hat(self, module, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.uses_batch_stats(module):  # what the layer normalized with (the local rule in train mode)
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        else:
            mean = module.running_mean.to(x.dtype).view(shape)
            var = module.running_var.to(x.dtype).view(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)


class InstanceNormRule(_ChannelNorm):
    """``nn.InstanceNorm1d/2d/3d(affine=True)``: weight and bias per channel (dim 1); statistics per sample and
    channel over the positions (each sample's own: the samples stay independent), or the running ones where
    the layer uses them (eval mode with ``track_running_stats``)."""

    def x_hat(self, module, x):
        if x.dim() == module._get_no_batch_dim():
            raise ValueError(f"MAS: {type(module).__name__} was given an unbatched input of shape {tuple(x.shape)}; "
                             "call it on a batch (N, C, ...)")
        if module.running_mean is not None and not module.training:
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean = module.running_mean.to(x.dtype).view(shape)
            var = module.running_var.to(x.dtype).view(shape)
        else:
            var, mean = torch.var_mean(x, dim=list(range(2, x.dim())), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)


class AffineNormRule(GenericRule):
    """A norm of another library (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ``Qwen2RMSNorm``...): a
    module named ``*Norm*`` with a 1-D ``weight`` (and ``bias``) and no submodules.

    Exact: the module-local per-sample vjp (its forward, whatever it is). Local: the norms' convention
    ``|y * x_hat|`` (weight) and ``|y|`` (bias), with ``x_hat`` the normalized input. Which normalization
    the module computes is observed, not assumed: on each call, ``x_hat`` from the RMS norm and from the
    layer norm of the input (over the weight's dim, with the module's ``eps``/``variance_epsilon``) is
    tried against the module's output, scaled by ``w`` or ``1 + w`` (Gemma) plus the bias; one that
    reproduces the output is used, and when none does the error names the layer.
    """

    local_supported = True

    def __init__(self):
        super().__init__(("weight", "bias"))

    def local(self, layer, call, accs):
        module = layer.module
        dt = next(iter(accs.values())).dtype
        x = call.x.detach().to(dt)
        y = call.outputs[0].detach().to(dt)
        w = module.weight.detach().to(dt)
        b = module.bias.detach().to(dt) if isinstance(getattr(module, "bias", None), torch.Tensor) else None
        x_hat = _observed_x_hat(module, x, y, w, b)
        if x_hat is None:
            raise ValueError(
                f"MAS(importance='local'): layer {layer.name!r} ({type(module).__name__}) is named like a norm but "
                "its output is neither an RMS norm nor a layer norm of its input scaled by its weight; register a "
                "rule for it (mas_kernels.register_rule), or pass uncovered='global'"
            )
        ya = y.abs()
        if "weight" in accs:
            accs["weight"].add_((ya * x_hat.abs()).reshape(-1, *w.shape).sum(0))
        if "bias" in accs and b is not None:
            accs["bias"].add_(ya.reshape(-1, *w.shape).sum(0))


def looks_like_norm(module: nn.Module) -> bool:
    """A module :class:`AffineNormRule` may serve (see there)."""
    if "Norm" not in type(module).__name__ or next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    return (w is not None and w.dim() == 1 and set(params) <= {"weight", "bias"}
            and all(p.shape == w.shape for p in params.values()))


def _observed_x_hat(module, x, y, w, b):
    """The normalized input whose affine map by ``w`` (or ``1 + w``) and ``b`` reproduces ``y``, or None."""
    eps = next((float(getattr(module, a)) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, a, None), (int, float))), 1e-6)
    n = w.shape[0]
    if x.shape[-1] != n or y.shape != x.shape:
        return None
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
    candidates = [x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), (x - mean) * torch.rsqrt(var + eps)]
    tol = 2e-2 if y.dtype != torch.float64 else 1e-6
    scale = y.abs().max().item() if y.numel() else 0.0
    for x_hat in candidates:
        for s in (w, 1 + w):
            got = x_hat * s + (b if b is not None else 0)
            if (got - y).abs().max().item() <= tol * max(scale, 1e-12):
                return x_hat
    return None
