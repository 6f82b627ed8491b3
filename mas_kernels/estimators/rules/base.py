r"""The rule interface and registry: from a layer's recorded calls to the importance numerators of its parameters.

A rule knows one layer type. Given the calls of one forward (each with the
layer's input and the loss gradient ``delta`` w.r.t. its output) and the
number of samples N, it adds

* ``exact``: ``sum_k |g_k|``, the sum over samples of the absolute per-sample
  gradient of each parameter it covers (the paper's Eq. 2, numerator), where
  ``g_k`` sums the sample's positions and all of the layer's calls;
* ``local``: the Hebbian numerator ``sum |y| |x|^T`` of one call (forward only).

Rules for parameters shared between layers (tied weights) expose their
per-sample gradients in factored form (``factors``: ``g_k = a_k^T b_k``) or
densely (``per_sample``), so the contributions of all uses are summed per
sample before the absolute value.

:func:`register_rule` adds a rule for a layer type of your own (Opacus'
``register_grad_sampler`` shape); :func:`rule_for` finds the rule of a module.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..capture import Call

if TYPE_CHECKING:
    from ..plan import Layer


@dataclasses.dataclass(frozen=True)
class Context:
    """What every rule call shares: the batch's sample count and the memory budget for scratch."""

    n: int
    budget: int = 256 << 20  # bytes of per-sample scratch a rule may hold at once
    max_chunk: int | None = None  # at most this many samples per chunk
    layout: int | None = None  # where the model's input keeps its samples (dim 1: a (T, N, ...) model)


class Rule:
    """Base class: the parameters ``attrs`` of a layer type and how each gets its importance."""

    attrs: tuple[str, ...] = ("weight", "bias")
    #: whether the rule can find each call's samples alone (False: it needs the whole model's per-sample rule)
    local_supported: bool = True

    def reads(self, layer: Layer, x: torch.Tensor) -> int | None:
        """The dim of ``x`` that holds samples when ``layer`` reads it as its input (None: one unbatched sample)."""
        if layer.hint is not None and x.dim() > layer.hint + 1:
            return layer.hint
        return 0 if x.dim() > 0 else None

    def feature_dims(self, layer: Layer, x: torch.Tensor) -> int:
        """How many trailing dims of ``layer``'s input ``x`` are features (the others hold samples, positions)."""
        return 1

    def check(self, layer: Layer) -> None:
        """Raise a worded error, before any forward pass, if the exact rule cannot serve ``layer`` as it is."""

    def covers(self, module: nn.Module) -> list[str]:
        """The attribute names of the parameters of ``module`` this rule gives importance to."""
        return [a for a in self.attrs if isinstance(getattr(module, a, None), nn.Parameter)]

    def exact(self, layer: Layer, calls: list[Call], ctx: Context, accs: dict[str, torch.Tensor]) -> None:
        """Add ``sum_k |g_k|`` for each attribute in ``accs`` (fp32 tensors of the parameter's shape).

        The default materialises per-sample gradients (:meth:`per_sample`) in
        chunks of samples within ``ctx.budget``; rules with a fused form override it.
        """
        step = self.chunk(layer.module, ctx)
        for lo in range(0, ctx.n, step):
            grads = self.per_sample(layer, calls, ctx, list(accs), lo, min(ctx.n, lo + step))
            for attr, acc in accs.items():
                acc.add_(grads[attr].abs().sum(0))

    def per_sample(self, layer: Layer, calls: list[Call], ctx: Context, attrs: list[str], lo: int, hi: int
                   ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``(hi - lo, *param.shape)`` of samples ``lo:hi``, summed over calls (fp32).

        The base default has none: :func:`register_rule` refuses a rule that defines neither this nor
        :meth:`exact`."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample form")

    def factors(self, layer: Layer, calls: list[Call], ctx: Context, attr: str
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(a, b)`` with ``a`` (N, T, J), ``b`` (N, T, I) such that sample k's gradient is ``a_k^T b_k``, or None."""
        return None

    def sparse_rows(self, layer: Layer, calls: list[Call], ctx: Context, attr: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(samples, rows, values)``: each sample's gradient as a few rows of the parameter (an
        embedding's tokens), or None when the rule has no such form."""
        return None

    def local(self, layer: Layer, call: Call, accs: dict[str, torch.Tensor]) -> None:
        """Add the Hebbian numerators of one call for each attribute in ``accs``.

        Called only where ``local_supported``; :func:`register_rule` refuses a rule that claims it without
        defining this."""
        raise NotImplementedError(f"{type(self).__name__} has no local (Hebbian) rule")

    def chunk(self, module: nn.Module, ctx: Context, per_sample_bytes: int | None = None) -> int:
        """Samples per chunk of per-sample scratch (default: the covered parameters in fp32) within the budget."""
        size = per_sample_bytes or 4 * sum(getattr(module, a).numel() for a in self.covers(module)) or 1
        return max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // size))


_RULES: dict[type, Rule] = {}
_BY_NAME: dict[str, Callable[[], tuple[type, Rule] | None]] = {}


def register_rule(layer_type: type, rule: Rule) -> None:
    """Use ``rule`` for modules of ``layer_type`` (and its subclasses without a rule of their own)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: rule must be a mas_kernels Rule, got {type(rule).__name__}")
    cls = type(rule)
    if cls.exact is Rule.exact and cls.per_sample is Rule.per_sample:
        raise TypeError(f"register_rule: {cls.__name__} defines neither exact() nor per_sample(); the exact "
                        "rule needs one of them")
    if rule.local_supported and cls.local is Rule.local:
        raise TypeError(f"register_rule: {cls.__name__} has no local(); define it, or set local_supported = False "
                        "(its layers are then left to the wrapper's uncovered= policy under importance='local')")
    _RULES[layer_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of the nearest class in ``type(module)``'s MRO that has one."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def sample_dim(t: torch.Tensor, ctx: Context, feature_dims: int, layer: Layer) -> int | None:
    """Which dim of ``layer``'s input ``t`` holds the batch's N samples (None: an unbatched sample).

    ``feature_dims`` trailing dims are features. The layer's hint (dim 1
    inside a ``batch_first=False`` transformer layer of torch), else the
    model's layout (where its input keeps the samples, dim 1 for a (T, N, ...)
    model), when its size is N; else dim 0 when its size is N, else the one
    other leading dim of size N; an input with no dim besides its features is
    one sample.
    """
    name, n = layer.name, ctx.n
    lead = t.dim() - feature_dims
    for hint in (layer.hint, ctx.layout):
        if hint is not None and hint < lead and t.shape[hint] == n:
            return hint
    if lead <= 0:
        if n != 1:
            raise ValueError(f"MAS: layer {name!r} got an unbatched input of shape {tuple(t.shape)} "
                             f"in a batch of {n} samples")
        return None
    if t.shape[0] == n:
        return 0
    if n == 1:
        return None  # one sample without a batch dim: all of it is that sample
    dims = [d for d in range(lead) if t.shape[d] == n]
    if len(dims) != 1:
        raise ValueError(
            f"MAS: cannot tell which dim of layer {name!r}'s input {tuple(t.shape)} holds the {n} samples of "
            "the batch (a per-sample rule needs them apart); keep the samples in one dim of the layer's input, "
            "or use importance='global_batch'"
        )
    return dims[0]


def batched(t: torch.Tensor, n: int, feature_dims: int, dim: int | None) -> torch.Tensor:
    """``t`` as (N, T, *features): sample dim ``dim`` first (None: one unbatched sample), the rest in T."""
    feats = tuple(t.shape[t.dim() - feature_dims:])
    if dim is None:
        return t.reshape(1, -1, *feats)
    if dim != 0:
        t = t.movedim(dim, 0)
    return t.reshape(n, -1, *feats)


def cat_uses(ts: list[torch.Tensor]) -> torch.Tensor:
    """Several uses' per-sample factors ``(N, T_i, .)`` as one ``(N, sum T_i, .)`` (one ``abs_bmm`` sums
    their contributions before the abs); a single use as it is, not copied."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)
