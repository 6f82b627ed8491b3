r"""The self-check: the fast path against the literal per-sample definition, before anything is committed.

On the first batch of each call signature in an ``estimate()`` /
``accumulating()`` (every batch with ``verify="always"``), the exact
estimator's numerators of 2 of the batch's samples alone (1 when it has one:
the batch's own recorded calls cut to those samples, or, where a call cannot
be cut, a run on that sub-batch) are compared, parameter by parameter, with the
definition taken literally:

.. math:: \sum_{k \in S} r\Big(\frac{\partial \|F(x_k)\|_2^2}{\partial \theta}\Big)

one forward and one backward per sample ``x_k``, each run alone (a batch of
one). Both run in eval mode (the rules' structure is what is checked, not
dropout's draws). A parameter whose two values differ by more than the
round-off of its dtype is named in a :class:`VerificationError`, with its
layers and what to do; the batch is not committed. This is the guarantee for
layers nobody foresaw: a rule that is wrong for a model cannot stay silent.
"""

from __future__ import annotations

import collections
import math

import torch

from .capture import LayoutChanged, grad
from .layout import UNKNOWN, Flat, same_values, take
from .global_exact import squared_norm


class VerificationError(ValueError):
    """The fast per-layer rules disagree with the per-sample definition on the self-check's sub-batch."""


def _rtol(dtypes) -> float:
    """How far the fast path may be from the definition, in L1 relative to the parameter's importance: the
    round-off of per-sample sums that cancel (a bias's gradient summed over 1024 positions: float32 differs
    in the 3rd digit there), far below what a wrong rule gives (a missed use, samples taken in the wrong
    dim: tens of percent)."""
    if all(d == torch.float64 for d in dtypes):
        return 1e-8
    if any(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return 5e-2
    return 1e-2


def literal(batch, idx: list[int], params: dict[str, torch.Tensor], output_fn, reduction):
    """``sum_{k in idx} r(d ||F(x_k)||^2 / d theta)``, one sample at a time (in float32, float64 for a float64
    parameter), and each sample's output ``F(x_k)``."""
    names = list(params)
    wide = {k: torch.promote_types(p.dtype, torch.float32) for k, p in params.items()}
    out: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    outputs = []
    for k in idx:
        one = batch if k is None else batch.subset([k])
        with torch.enable_grad():
            y = output_fn(one.forward())
            grads = grad(squared_norm(y), [params[n] for n in names], allow_unused=True)
        outputs.append(y.detach())
        with torch.no_grad():  # the gradients are ours: r may work in place on them
            got = [(n, g.detach().to(wide[n])) for n, g in zip(names, grads) if g is not None]
            more = [(out[n], g) for n, g in got if out[n] is not None]
            storages = [g.untyped_storage().data_ptr() for _, g in got]
            shared = {ptr for ptr, k in collections.Counter(storages).items() if k > 1}
            for (n, g), ptr in zip(got, storages):
                if out[n] is None:  # a gradient autograd gave as a view of a buffer it shares is copied
                    out[n] = reduction.apply(g.clone() if ptr in shared else g)
            if more:
                reduction.accumulate_([a for a, _ in more], [g for _, g in more])
    return {n: torch.zeros_like(params[n], dtype=wide[n], memory_format=torch.contiguous_format) if t is None else t
            for n, t in out.items()}, outputs


def mismatches(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtypes: dict) -> list[tuple[str, float]]:
    """``(name, relative error)`` of each parameter whose fast numerators are not the reference's.

    The error is measured in L1 on the parameter's own scale, floored at 1e-3 of the model's largest mean
    importance (a parameter whose true importance is 0 holds only round-off in both). Two sums per
    parameter (``sum |r|``, ``sum |f - r|``, one host synchronization), computed in place: both
    dicts are the self-check's own and are spent by it; a non-finite one is skipped (a
    non-finite batch: the commit's finite check rejects it, by name)."""
    stats = {}
    names = [n for n, r in ref.items() if r.numel()]
    if names:
        with torch.no_grad():  # in place: both sides are the self-check's own buffers, dropped after it
            refs = [ref[n] for n in names]
            diffs = [fast[n] if fast[n].dtype == r.dtype else fast[n].to(r.dtype) for n, r in zip(names, refs)]
            torch._foreach_sub_(diffs, refs)
            both = refs + diffs
            torch._foreach_abs_(both)
            # sum |r|, sum |f - r| (pairwise sums: the multi-tensor L1 norm adds serially, 1e-5 off in float32
            # on 3e4 elements, and in float64 it converts every tensor first: 2.6x slower here)
            values = torch.stack([t.sum().double() for t in both]).tolist()  # one host synchronization
        for j, n in enumerate(names):
            size, diff = values[j], values[len(names) + j]
            if math.isfinite(size) and math.isfinite(diff):
                stats[n] = (diff / ref[n].numel(), size / ref[n].numel())
    top = max((s for _, s in stats.values()), default=0.0)
    bad = []
    for n, (diff, size) in stats.items():
        err = diff / max(size, 1e-3 * top, 1e-30)
        if not err <= _rtol([dtypes[n]]):
            bad.append((n, err))
    return bad


class Request:
    """What the self-check asks of the batch's own run: the numerators of its samples ``idx`` alone, into
    ``fast`` (``done`` once the estimator filled them from the batch's recorded calls, with ``output``: the
    batch's output at those samples)."""

    def __init__(self, batch, names: list[str], params: dict[str, torch.Tensor]):
        layout = batch.layout
        self.idx = (sorted({1, batch.n - 1}) if batch.n > 1 else [0]) if not layout.single else [None]
        self.names = names
        # contiguous, as the staging's views are (a channels-last weight's zeros_like would not be)
        self.fast = {n: torch.zeros_like(params[n], dtype=torch.float64 if params[n].dtype == torch.float64
                                         else torch.float32, memory_format=torch.contiguous_format) for n in names}
        self.done = False
        self.output = None

    @property
    def sliceable(self) -> bool:
        return self.idx != [None]


def self_check(estimator, batch, names: list[str], params: dict[str, torch.Tensor], output_fn, plan,
               request: Request | None = None, observe=None) -> None:
    """Raise :class:`VerificationError` when ``estimator`` disagrees with :func:`literal` on 2 samples of
    ``batch`` (the fast numerators from the batch's own run when ``request`` was filled there, else from a
    run on the sub-batch); nothing is written anywhere else."""
    layout = batch.layout
    request = request or Request(batch, names, params)
    idx = request.idx
    dtype = {n: params[n].dtype for n in names}
    if request.done:
        together = request.output
    else:
        for t in request.fast.values():
            t.zero_()
        sub = batch.subset(idx) if idx != [None] else batch
        try:
            together = estimator.run(sub, request.fast, names)
        except LayoutChanged:
            if observe is None or sub is batch:
                raise
            # The model calls its layers otherwise on these samples alone (control flow that follows the
            # data): the sub-batch's own layout (``observe(sub)``), then its run again.
            for t in request.fast.values():
                t.zero_()
            sub.layout = observe(sub)
            together = estimator.run(sub, request.fast, names)
    fast = request.fast
    ref, outputs = literal(batch, idx, {n: params[n] for n in names}, output_fn, estimator.reduction)
    d = layout.output
    if idx != [None] and together is not None and d is not None and d is not UNKNOWN and not (
            len({y.shape for y in outputs}) == 1  # every sample in one comparison first (one synchronization)
            and same_values(torch.cat(outputs, d.dim if isinstance(d, Flat) else d), together)):
        for j, y in enumerate(outputs):
            if not same_values(y, take(together, d, torch.tensor([j]))):
                raise VerificationError(
                    f"MAS(importance='global'): self-check failed, nothing was committed: sample {idx[j]}'s "
                    "output run alone differs from its output beside other samples, so the samples are not "
                    "independent and a per-sample gradient is not defined (train-mode BatchNorm, routing that "
                    "couples samples, batch-level pooling; or the samples are kept in another dim: pass "
                    "sample_dim=). Use importance='global_batch' (one gradient per batch)")
    bad = mismatches(fast, ref, dtype)
    if not bad:
        return
    slow = estimator.fallback(layout)
    layers = {}
    for n, _ in bad:
        layers[n] = [layer.name or "<model>" for layer, _ in plan.uses.get(n, [])]
    worst = sorted(bad, key=lambda t: -t[1])[:6]
    detail = ", ".join(f"{n} (layers {layers[n]}, {e:.1%} off)" for n, e in worst)
    raise VerificationError(
        f"MAS(importance='global'): self-check failed, nothing was committed: on {len(idx) if idx != [None] else 1} "
        f"sample(s) of the first batch the fast per-layer rules disagree with the per-sample definition (one "
        f"backward pass per sample) for {len(bad)} parameter(s): {detail}"
        f"{' (per-sample fallback already on for ' + str(sorted(set(slow) & set(layers))) + ')' if set(slow) & set(layers) else ''}. "
        "What to do: if the model keeps the samples of its input in another dim, pass sample_dim=...; to compute "
        f"these parameters by one backward pass per sample (slow, exact) pass per_sample_fallback={sorted(layers)!r}; "
        "if a layer has a rule you registered (mas_kernels.register_rule), check it against this. verify=False "
        "turns the check off."
    )
