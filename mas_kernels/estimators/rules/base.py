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
import functools
from typing import Callable

import torch
from torch import nn

from ... import _backend, _native
from ...ops import abs_outer_accumulate_
from ..capture import Call
from ..reduction import ABS, AbsReduction, Reduction


@dataclasses.dataclass(frozen=True)
class Context:
    """What every rule call shares: the batch's sample count, the memory budget for scratch, the reduction."""

    n: int
    budget: int = 256 << 20  # bytes of per-sample scratch a rule may hold at once
    max_chunk: int | None = None  # at most this many samples per chunk
    reduce: Reduction = ABS  # per-sample gradients -> numerators (|.| for MAS)


class Rule:
    """Base class: the parameters ``attrs`` of a layer type and how each gets its importance.

    The contract, in one place (``layer`` is a plan ``Layer``: ``.module``, ``.name``, ``.attrs``; a
    ``call`` is one recorded :class:`~..capture.Call` of the layer, with ``call.dims`` saying where each of
    its tensors keeps the batch's samples, as observed by the probe):

    * :meth:`covers`: the attribute paths of the module's parameters this rule serves;
    * :meth:`exact` (or :meth:`per_sample`, from which the default :meth:`exact` is made): the numerators
      ``sum_k r(g_k)`` of one batch, through ``ctx.reduce``; :meth:`factors` / :meth:`sparse_rows`: the
      per-sample gradient in factored / sparse form, for parameters shared by several layers;
    * :meth:`local`: the Hebbian numerators of one call (where ``local_supported``);
    * :meth:`accepts`: whether the rule can serve a call whose tensors keep their samples as observed
      (otherwise the layer's parameters get the per-sample fallback);
    * :meth:`unbatched` / :meth:`api_layout`: whether the layer takes its input as one unbatched sample,
      or in which dim its API keeps the samples (consulted when observing the model's input);
    * :meth:`check`: a worded error, before any forward pass, for a layer the exact rule cannot serve;
    * ``inline_forward(layer, args, kwargs) -> (outputs, replay)`` (optional): the layer's forward during
      the exact rule's recorded pass (an RNN's step replay), its ``replay`` kept on the call;
    * ``own_layout``: the rule reads its layer's layout from the layer's API (``batch_first``), not from
      the observed dims (MultiheadAttention, the RNNs);
    * ``eager``: :meth:`exact` of a layer called once may run inside the backward pass, as soon as its call's
      output gradient is complete (it reads nothing but that call's input and output gradient).
    """

    attrs: tuple[str, ...] = ("weight", "bias")
    #: whether the rule has a local (Hebbian) form (False: the wrapper's uncovered= policy applies)
    local_supported: bool = True
    #: whether the layer's own API says where its samples are (batch_first), so calls are never broadcast
    own_layout: bool = False
    #: the layer's forward during the exact rule's recorded pass, or None (see the class docstring)
    inline_forward: Callable | None = None
    #: whether exact() of a layer called once may run inside the backward (see the class docstring)
    eager: bool = False

    def unbatched(self, layer, x: torch.Tensor) -> bool:
        """Whether ``layer`` takes ``x`` as one unbatched sample (a 1-D input of a Linear)."""
        return x.dim() == 0

    def api_layout(self, layer, x: torch.Tensor):
        """Where the layer's API keeps the samples of its input ``x``: ``"unbatched"``, a dim (rules with
        ``own_layout``: an RNN's ``batch_first``), or None (the API does not say: observed)."""
        return "unbatched" if self.unbatched(layer, x) else None

    def feature_dims(self, layer, x: torch.Tensor) -> int:
        """How many trailing dims of ``layer``'s input ``x`` are features (the others hold samples, positions)."""
        return 1

    def accepts(self, layer, dims) -> bool:
        """Whether the rule serves a call whose tensors keep their samples as ``dims`` (a ``CallDims``) say."""
        return dims.known

    def check(self, layer) -> None:
        """Raise a worded error, before any forward pass, if the exact rule cannot serve ``layer`` as it is."""

    def covers(self, module: nn.Module) -> list[str]:
        """The attribute names of the parameters of ``module`` this rule gives importance to."""
        return [a for a in self.attrs if isinstance(getattr(module, a, None), nn.Parameter)]

    def exact(self, layer, calls: list[Call], ctx: Context, accs: dict[str, torch.Tensor]) -> None:
        """Add ``sum_k r(g_k)`` (``ctx.reduce``: ``|g_k|`` for MAS) for each attribute in ``accs`` (tensors of
        the parameter's shape, float32 or float64: compute in their dtype).

        The default materialises per-sample gradients (:meth:`per_sample`) in
        chunks of samples within ``ctx.budget``; rules with a fused form override it.
        """
        step = self.chunk(layer.module, ctx)
        for lo in range(0, ctx.n, step):
            grads = self.per_sample(layer, calls, ctx, list(accs), lo, min(ctx.n, lo + step))
            for attr, acc in accs.items():
                ctx.reduce.dense_(acc, grads[attr])

    def exact_many(self, work: list[tuple], ctx: Context) -> None:
        """:meth:`exact` of several layers of this rule in one batch, ``work`` a list of ``(layer, calls, accs)``
        with numerators of their own (no parameter shared between them). The default runs them one after the
        other; a rule whose cost per layer is mostly fixed (Python, one native call) serves them at once."""
        for layer, calls, accs in work:
            self.exact(layer, calls, ctx, accs)

    def per_sample(self, layer, calls: list[Call], ctx: Context, attrs: list[str], lo: int, hi: int
                   ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``(hi - lo, *param.shape)`` of samples ``lo:hi``, summed over calls (float32, or
        float64 for a float64 parameter).

        The base default has none: :func:`register_rule` refuses a rule that defines neither this nor
        :meth:`exact`."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample form")

    def factors(self, layer, calls: list[Call], ctx: Context, attr: str
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(a, b)`` with ``a`` (N, T, J), ``b`` (N, T, I) such that sample k's gradient is ``a_k^T b_k``, or None."""
        return None

    def sparse_rows(self, layer, calls: list[Call], ctx: Context, attr: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(samples, rows, values)``: each sample's gradient as a few rows of the parameter (an
        embedding's tokens), or None when the rule has no such form."""
        return None

    def local(self, layer, call: Call, accs: dict[str, torch.Tensor]) -> None:
        """Add the Hebbian numerators of one call for each attribute in ``accs``.

        Called only where ``local_supported``; :func:`register_rule` refuses a rule that claims it without
        defining this."""
        raise NotImplementedError(f"{type(self).__name__} has no local (Hebbian) rule")

    def chunk(self, module: nn.Module, ctx: Context, per_sample_bytes: int | None = None) -> int:
        """Samples per chunk of per-sample scratch (default: the covered parameters in fp32) within the budget."""
        size = per_sample_bytes or 4 * sum(getattr(module, a).numel() for a in self.covers(module)) or 1
        return max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // size))


_RULES: dict[type, Rule] = {}


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
    """The rule of the nearest class in ``type(module)``'s MRO that has one, if the module runs that class's
    ``forward``: a subclass that overrides it (a Linear that scales its output, a Conv2d that standardizes
    its weight) computes something else, and has no rule unless one is registered for it (its parameters
    then get the per-sample fallback, exact for any forward)."""
    kind = type(module)
    for cls in kind.__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule if cls is kind or getattr(kind, "forward", None) is getattr(cls, "forward", None) else None
    return None


def work_dtype(*ts) -> torch.dtype:
    """The dtype rules compute in: float64 for a float64 model, float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def abs_outer_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += |a|^T |b|`` (the local rule's rows): the fused op for float32 Omega, a GEMM in float64."""
    if acc.dtype == torch.float32:
        abs_outer_accumulate_(acc, a, b)
    else:
        acc.add_(a.to(acc.dtype).abs().T @ b.to(acc.dtype).abs())


_SMALL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def native_sums(ctx: Context, accs, ts):
    """The native module where its fused small sums (``csrc/rule_sums.cpp``: a bias's, an embedding's rows, a
    LayerNorm's) can add ``sum_k |g_k|`` straight into ``accs`` from ``ts``: MAS's reduction, contiguous float32
    numerators and 16/32-bit float inputs on a CPU whose ops run natively; else None (the rule's PyTorch path:
    another reduction, float64, other devices, a build without them)."""
    lib = native_lib(ctx)
    return lib if lib is not None and native_fits(accs, ts) else None


def native_lib(ctx: Context):
    """The native module where its fused sums serve ``ctx`` on a CPU (MAS's reduction, the native backend, a
    build that has them), else None; whether they serve given tensors: :func:`native_fits`."""
    if type(ctx.reduce) is not AbsReduction:
        return None
    return _native_for(_backend.choose(_CPU))


@functools.lru_cache(maxsize=None)
def _native_for(backend: str):
    """The native module when ``backend`` serves the CPU, it loaded, and it has the fused sums; else None."""
    if backend != "native" or not _native.built():
        return None
    lib = _native.lib()
    return lib if hasattr(lib, "abs_position_sums_") else None


def native_fits(accs, ts) -> bool:
    """Whether the native sums take ``accs`` (contiguous float32 CPU) and the inputs ``ts`` (16/32-bit float,
    CPU)."""
    for acc in accs:
        if acc.dtype != torch.float32 or acc.device.type != "cpu" or not acc.is_contiguous():
            return False
    for t in ts:
        if t.dtype not in _SMALL_FLOATS or t.device.type != "cpu":
            return False
    return True


_CPU = torch.device("cpu")


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (the native sums' rows), copied only when it has not."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def cat_uses(ts: list[torch.Tensor]) -> torch.Tensor:
    """Several uses' per-sample factors ``(N, T_i, .)`` as one ``(N, sum T_i, .)`` (one ``abs_bmm`` sums
    their contributions before the abs); a single use as it is, not copied."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)
