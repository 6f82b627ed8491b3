"""Flat storage for per-parameter tensors (Omega, theta*, accumulators).

One contiguous buffer per (device, dtype) holds the values of many parameters;
each parameter gets a view of its shape. Whole-model operations (zeroing,
scaling, the finite check, all-reduce, the penalty) then touch a handful of
buffers instead of one tensor per parameter.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Iterable

import torch

from . import checkpoint


class FlatBuffers:
    """Named views into flat buffers grouped by (device, dtype).

    Each view starts on a 16-byte boundary (the buffers hold a few zeros of
    padding between views), so every view qualifies for the kernels'
    128-bit full-chunk path: an unpadded 10-element bias would leave every
    view after it misaligned.

    Args:
        specs: ``(name, shape, device, dtype)`` for each parameter, in order.
        dtype: the buffers' dtype: one for every parameter, a callable from a parameter's dtype to
            its buffer's (float32 for Omega, float64 for a float64 parameter's), or ``None`` to keep
            each parameter's own dtype (anchors).
    """

    def __init__(self, specs: Iterable[tuple[str, torch.Size, torch.device, torch.dtype]], dtype=None):
        specs = list(specs)
        sizes: dict[tuple, int] = {}
        where: list[tuple] = []
        for name, shape, device, pdtype in specs:
            key = (torch.device(device), dtype(pdtype) if callable(dtype) else (dtype or pdtype))
            align = max(1, 16 // key[1].itemsize)
            start = -(-sizes.get(key, 0) // align) * align
            n = 1
            for s in shape:
                n *= int(s)
            sizes[key] = start + n
            where.append((name, tuple(shape), key, start, n))
        # Never inference tensors (a buffer first touched inside the user's torch.inference_mode() would
        # refuse every in-place update after it).
        with torch.inference_mode(False):
            self.buffers: dict[tuple, torch.Tensor] = {
                key: torch.zeros(total, dtype=key[1], device=key[0]) for key, total in sizes.items()
            }
        self.views: dict[str, torch.Tensor] = {
            name: self.buffers[key][start:start + n].view(shape) for name, shape, key, start, n in where
        }

    def names(self) -> list[str]:
        return list(self.views)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def swap(self, other: "FlatBuffers") -> None:
        """Exchange contents with ``other`` (same layout): no copy, and whoever holds either object
        sees the other's values from now on."""
        self.buffers, other.buffers = other.buffers, self.buffers
        self.views, other.views = other.views, self.views

    def zero_(self) -> None:
        for b in self.buffers.values():
            b.zero_()

    def all_finite(self) -> bool:
        """Whether every element of every buffer is finite.

        A sum with an inf or a NaN in it is inf or NaN, so a finite sum proves
        every element finite: one reduction (~25 us for 0.5M fp32 on 2 cores,
        where ``isfinite(b).all()`` took ~900 us). A non-finite sum is either a
        non-finite element or a float32 overflow of finite ones; the sum in
        float64 tells them apart (float32 values cannot overflow it).
        """
        for b in self.buffers.values():
            if not bool(torch.isfinite(b.sum())) and not bool(torch.isfinite(b.sum(dtype=torch.float64))):
                return False
        return True

    def first_non_finite(self) -> str | None:
        for name, v in self.views.items():
            if not bool(torch.isfinite(v).all()):
                return name
        return None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]

    def scope(self, layers: list, names) -> contextlib.AbstractContextManager:
        """The rules write ``names``'s numerators for ``layers`` inside this block (nothing to do here: the
        views are the numerators; a sharded state's staging reduce-scatters them per block, fsdp.py)."""
        return contextlib.nullcontext(self)

    def per_sample_backward(self, names: list[str]) -> None:
        """The exact rule is about to run one backward pass per sample for ``names`` (parameters used outside
        their layers' forward): fine here; a sharded state's staging refuses it by name (fsdp.py)."""

    def __contains__(self, name: str) -> bool:
        return name in self.views

    def __iter__(self):
        return iter(self.views)

    def __len__(self) -> int:
        return len(self.views)

    def items(self):
        return self.views.items()


COMBINE = ("sum", "mean")


def check_combine(combine, who: str = "MAS") -> str | float:
    """``"sum"``, ``"mean"`` or a float alpha in [0, 1]."""
    if isinstance(combine, str):
        if combine not in COMBINE:
            try:
                hint = f"; for alpha pass the number {float(combine)!r}, not a string"
            except ValueError:
                hint = ""
            raise ValueError(f"{who}: combine={combine!r} must be 'sum', 'mean' or a float alpha in [0, 1]{hint}")
        return combine
    if isinstance(combine, bool) or not isinstance(combine, numbers.Real):
        raise ValueError(f"{who}: combine={combine!r} must be 'sum', 'mean' or a float alpha in [0, 1]")
    alpha = float(combine)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{who}: combine alpha={alpha} must lie in [0, 1]")
    return alpha


def grows(old: tuple, new: tuple) -> bool:
    """Whether shape ``new`` extends ``old``: as many dims, none smaller (e.g. a head gaining classes)."""
    return len(old) == len(new) and all(o <= n for o, n in zip(old, new))


def leading(shape: tuple) -> tuple:
    """The index of the leading ``shape`` block of a tensor at least that big in every dim."""
    return tuple(slice(0, s) for s in shape)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# What Omega and theta* may be stored in: float32's range (float16's ends at 65504, and would
# turn large importances into inf and tiny ones into 0), or float64 (float64 models: results to
# float64 rounding).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def acc_dtype_for(omega_dtype: torch.dtype) -> torch.dtype:
    """The accumulator's (and staging's) dtype: float64 with a float64 Omega, else float32."""
    return torch.float64 if omega_dtype == torch.float64 else torch.float32


class Wide:
    """The dtype of a parameter's importance buffers: ``dtype``, or float64 for a float64 parameter (whose
    numerators are computed in float64 and kept so: Omega to float64's precision)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, pdtype: torch.dtype) -> torch.dtype:
        return torch.float64 if pdtype == torch.float64 else self.dtype


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class ImportanceState:
    r"""What a MAS wrapper knows about its parameters, by name.

    * ``omega``: the importance Omega after the consolidated tasks (``omega_dtype``, float32 by default);
    * ``anchors``: theta*, the parameters at the last consolidation (``anchor_dtype``;
      default: each parameter's own dtype);
    * ``acc``: the open task's importance numerators (sums over samples, float32; float64
      with a float64 Omega);
    * ``staging``: one batch's numerators, added to ``acc`` only when the batch is finite
      and the running sum stays finite;
    * ``num_samples`` and ``num_batches`` (open task), ``samples_consolidated``, ``num_tasks``.

    Memory: ``omega`` and ``anchors`` are held for life; ``acc`` and ``staging``
    (float32, one element per tracked parameter element each) only from the
    first batch of a task until :meth:`fold` (``consolidate()``), so outside
    estimation the state is ``(omega bytes + anchor bytes)`` per element:
    8 bytes for a float32 model by default, 4 with bfloat16 Omega and anchors.

    Finite check of a batch (:meth:`commit_batch`), where the error surfaces:

    * on CPU, at once: the batch's ``commit`` raises ``FloatingPointError``
      naming the layer, and neither the batch nor its samples are counted;
    * on other devices (CUDA), without a host synchronization per batch: a
      batch that is not finite, or that would make the float32 running sum
      overflow, is discarded on the device (``acc = where(ok, acc + batch,
      acc)``), a sticky device flag records it with the layer, and the error
      is raised at the next :meth:`check_finite` (``MAS.consolidate()``,
      ``save()``, ``state_dict()``, ``check_finite()``), once; the other
      batches stay in the accumulator. :attr:`defer_finite_check` chooses the
      deferred path on every device (tests use it on CPU).

    Args:
        params: the tracked parameters, by name.
        old: a previous state whose values carry over by name, as do the
            counts. A parameter that *grew* (same number of dims, none smaller,
            e.g. a head gaining classes) keeps Omega, theta* and the open
            accumulator on its leading entries in every dim; its new entries
            start at zero importance (theta* = the parameter's values then).
            A parameter whose shape changed otherwise starts from zero, with a
            warning naming it.
        omega_dtype: float32 (default), bfloat16 or float64 storage for Omega (float64 also
            makes the accumulator float64).
        anchor_dtype: storage for theta*; None (default): each parameter's dtype when
            first tracked (kept across rebuilds: ``old``'s, or ``anchor_dtypes[name]``).
    """

    PARTS = ("omega", "anchors", "accumulator")
    COUNTS = ("num_samples", "num_batches", "samples_consolidated", "num_tasks")
    OPTIONAL = {"num_batches": 0}  # files written before it was kept
    defer_finite_check: bool | None = None  # None: deferred on devices other than CPU

    def __init__(self, params: dict[str, torch.Tensor], old: "ImportanceState | None" = None, *,
                 omega_dtype: torch.dtype = torch.float32, anchor_dtype: torch.dtype | None = None,
                 anchor_dtypes: dict[str, torch.dtype] | None = None):
        self.specs = [(n, p.shape, p.device, p.dtype) for n, p in params.items()]
        self.omega_dtype, self.anchor_dtype = omega_dtype, anchor_dtype
        self.acc_dtype = acc_dtype_for(omega_dtype)
        self.omega = FlatBuffers(self.specs, dtype=Wide(omega_dtype))
        # theta* keeps the dtype it was made with (a parameter's dtype when first tracked): a later
        # model.half() does not round the anchors of a state rebuilt for another reason.
        kept = {} if old is None else {n: t.dtype for n, t in old.anchors.items()}
        kept.update(anchor_dtypes or {})
        self.anchors = FlatBuffers([(n, shape, dev, anchor_dtype or kept.get(n, dt))
                                    for n, shape, dev, dt in self.specs])
        self._acc: FlatBuffers | None = None
        self._staging: FlatBuffers | None = None
        self._commits = Commits(self.specs, self.omega)
        self.num_samples = 0
        self.num_batches = 0
        self.samples_consolidated = 0
        self.num_tasks = 0
        with torch.no_grad():
            for name, p in params.items():
                self.anchors[name].copy_(p)
            if old is not None:
                self._carry(params, old)

    def _carry(self, params: dict[str, torch.Tensor], old: "ImportanceState") -> None:
        old.settle()
        for key in self.COUNTS:
            setattr(self, key, getattr(old, key))
        self._commits.pending = old._commits.pending
        for name, p in params.items():
            if name not in old.omega:
                continue
            before, now = tuple(old.omega[name].shape), tuple(p.shape)
            if before == now:
                where = ...
            elif grows(before, now):
                where = leading(before)
            else:
                warnings.warn(f"MAS: parameter {name!r} changed shape from {before} to {now}; its importance and "
                              "theta* start from zero (they are kept only for a parameter that grows: as many "
                              "dims, none smaller). Restore the shape, or load a state saved for this shape, to "
                              "keep them", stacklevel=5)
                continue
            self.omega[name][where].copy_(old.omega[name])
            self.anchors[name][where].copy_(old.anchors[name])
            if old.has_acc():
                self.acc[name][where].copy_(old.acc[name])
        self._commits.reset(self._acc)

    # ------------------------------------------------------------- buffers
    @property
    def acc(self) -> FlatBuffers:
        """The open task's numerators, allocated (zeros) on first use and released by :meth:`fold`."""
        if self._acc is None:
            self._acc = FlatBuffers(self.specs, dtype=Wide(self.acc_dtype))
            self._commits.reset(self._acc, zeros=True)
        return self._acc

    @property
    def staging(self) -> FlatBuffers:
        """One batch's numerators, allocated on first use and released by :meth:`release`."""
        if self._staging is None:
            self._staging = FlatBuffers(self.specs, dtype=Wide(self.acc_dtype))
        return self._staging

    @property
    def pending(self) -> str | None:
        """A rejected batch's error, not yet raised (copies carry it over)."""
        return self._commits.pending

    @pending.setter
    def pending(self, msg: str | None) -> None:
        self._commits.pending = msg

    def has_acc(self) -> bool:
        return self._acc is not None

    def release(self, staging: bool = True) -> None:
        """Drop the accumulator (its values must have been folded or be unwanted) and the staging buffers."""
        self._acc = None
        self._commits.reset(None)
        if staging:
            self._staging = None

    def nbytes(self) -> int:
        """Bytes the state holds now (Omega, theta*, and the accumulator and staging while allocated)."""
        return sum(b.nbytes() for b in (self.omega, self.anchors, self._acc, self._staging) if b is not None)

    def stores(self) -> dict[str, FlatBuffers]:
        """The per-parameter stores by their ``state_dict`` name (allocates the accumulator)."""
        return {"omega": self.omega, "anchors": self.anchors, "accumulator": self.acc}

    # ------------------------------------------------------------- batches
    def deferred(self) -> bool:
        """Whether batches are checked on the device, without a host synchronization (see the class docstring)."""
        if self.defer_finite_check is not None:
            return bool(self.defer_finite_check)
        return any(key[0].type != "cpu" for key in self.omega.buffers)

    def begin_batch(self) -> None:
        self.staging.zero_()

    def commit_batch(self, n: int, weight: float = 1.0) -> None:
        """Add the batch's numerators (times ``weight`` > 0) to the accumulator and count the batch and
        its ``n`` samples, unless a numerator is not finite or the float32 running sum would overflow
        (:class:`Commits`: a rejected batch leaves the accumulator exactly as it was)."""
        if self.deferred():
            self._commits.on_device(self.staging, self.acc, n, weight)
        else:
            self._commits.now(self.staging, self.acc, weight)
        self.num_samples += n
        self.num_batches += 1

    def settle(self) -> None:
        """Read the device flag of the deferred check (one host synchronization); a rejected batch's
        samples leave the counts and its error waits for :meth:`check_finite`."""
        samples, batches = self._commits.settle()
        self.num_samples -= samples
        self.num_batches -= batches

    def check_finite(self) -> None:
        """Raise the ``FloatingPointError`` of a rejected batch, once (see the class docstring)."""
        self.settle()
        msg = self._commits.take_error()
        if msg is not None:
            raise FloatingPointError(msg)

    # --------------------------------------------------------------- tasks
    def fold(self, n: int, combine: str | float, divisor: float | None = None) -> None:
        """Omega <- combine(Omega, acc / divisor); the accumulator is released and the counts move on.

        ``n``: the task's sample count (summed over ranks by the caller when
        distributed); ``divisor``: what the accumulator is divided by (default
        ``n``; the number of batches for per-batch means). The combination is
        computed in the accumulator's dtype and rounded once into Omega's dtype.
        """
        divisor = n if divisor is None else divisor
        pairs = list(zip(self.omega.buffers.values(), self.acc.buffers.values()))
        with torch.no_grad():
            # Every value is >= 0, so the result is at most max(Omega) + max(acc) / divisor: when that
            # fits Omega's dtype the combination is made in the accumulator's buffer (no copy) and
            # rounded once into Omega; only near the end of the range is it checked first.
            limits = [float(torch.finfo(o.dtype).max) for o, _ in pairs]
            limit = min(limits)
            tops = [(float(o.amax()) if o.numel() else 0.0, float(a.amax()) / divisor if a.numel() else 0.0)
                    for o, a in pairs]
            safe = all(to + ta < 0.5 * lim for (to, ta), lim in zip(tops, limits))
            results = []
            for omega, acc in pairs:
                new = acc.div_(divisor) if safe else acc / divisor
                self._combine(new, omega, n, combine)
                results.append(new)
            if not safe:
                for (omega, _), new in zip(pairs, results):
                    if not bool(torch.isfinite(new).all()) or float(new.amax()) > limit:
                        bad = self._first_above(new, omega, limit)
                        raise FloatingPointError(
                            f"MAS.consolidate: Omega of layer {_layer(bad)!r} (parameter {bad!r}) would exceed "
                            f"{self.omega_dtype}'s range combined with the previous tasks (combine={combine!r}); "
                            "nothing changed. Activations or gradients are too large: rescale the inputs")
            for (omega, _), new in zip(pairs, results):
                omega.copy_(new)
        self.release(staging=False)
        self.samples_consolidated += n
        self.num_samples = self.num_batches = 0
        self.num_tasks += 1

    def consolidate(self, n: int, n_batches: int, combine: str | float, per_batch_mean: bool, params: dict,
                    session_open: bool) -> None:
        """``MAS.consolidate()`` once the numerators and counts are summed over the ranks (``n``,
        ``n_batches``: the task's samples and batches in all): Omega folded (divided by N, or by the number
        of batches for per-batch means), theta* snapshot from ``params`` (the tensors, local shards on
        FSDP2); the accumulator and staging released unless a session is open (its hooks still write
        into staging)."""
        if n == 0:
            if not self.num_samples:
                self.release(staging=not session_open)
            raise RuntimeError(
                "MAS.consolidate(): no samples seen since the last consolidate; call estimate() "
                "or run forward passes inside accumulating() first"
            )
        self.fold(n, combine, divisor=n_batches if per_batch_mean else n)
        self.snapshot(params)
        if not session_open:
            self.release()

    def _combine(self, new: torch.Tensor, omega: torch.Tensor, n: int, combine: str | float) -> None:
        """``new <- combine(Omega, new)`` in place in ``new`` (the accumulator's dtype)."""
        if self.num_tasks == 0:
            return
        if combine == "sum":
            new.add_(omega)
        elif combine == "mean":
            old_n = self.samples_consolidated
            new.mul_(n / (old_n + n)).add_(omega, alpha=old_n / (old_n + n))
        else:
            new.mul_(1.0 - combine).add_(omega, alpha=combine)

    def _first_above(self, new: torch.Tensor, omega: torch.Tensor, limit: float) -> str:
        """The first parameter whose entries of the flat ``new`` (laid out as the buffer ``omega``)
        are not finite or above ``limit``."""
        base = omega.data_ptr()
        for name, view in self.omega.items():
            if view.untyped_storage().data_ptr() != omega.untyped_storage().data_ptr():
                continue
            start = (view.data_ptr() - base) // view.element_size()
            part = new[start:start + view.numel()]
            if not bool(torch.isfinite(part).all()) or (part.numel() and float(part.amax()) > limit):
                return name
        return "?"

    def snapshot(self, params: dict[str, torch.Tensor]) -> None:
        """theta* <- theta."""
        with torch.no_grad():
            for name, p in params.items():
                self.anchors[name].copy_(p)

    # ------------------------------------------------------------- state_dict
    def state_dict(self) -> dict:
        """Copies of Omega, anchors and the accumulator (zeros when no task is open) by parameter name,
        and the counts."""
        self.settle()
        out: dict = {"omega": {n: t.detach().clone() for n, t in self.omega.items()},
                     "anchors": {n: t.detach().clone() for n, t in self.anchors.items()}}
        if self.has_acc():
            out["accumulator"] = {n: t.detach().clone() for n, t in self._acc.items()}
        else:
            out["accumulator"] = {n: torch.zeros(shape, dtype=Wide(self.acc_dtype)(dt), device=device)
                                  for n, shape, device, dt in self.specs}
        out.update({k: getattr(self, k) for k in self.COUNTS})
        return out

    def check(self, state, who: str) -> None:
        """Raise ``ValueError`` naming the entry at fault unless ``state`` fits these parameters exactly
        (see :func:`checkpoint.validate`)."""
        dtypes = {"omega": {n: t.dtype for n, t in self.omega.items()},
                  "anchors": {n: t.dtype for n, t in self.anchors.items()},
                  "accumulator": {n: Wide(self.acc_dtype)(dt) for n, _, _, dt in self.specs}}
        checkpoint.validate(state, [(n, tuple(shape)) for n, shape, _, _ in self.specs], self.PARTS, self.COUNTS,
                            self.OPTIONAL, who, dtypes)

    def load_state_dict(self, state: dict, who: str = "MAS.load_state_dict") -> None:
        """Load what :meth:`state_dict` gave; everything is checked before anything changes."""
        self.check(state, who)
        acc = state["accumulator"]
        open_task = int(state["num_samples"]) > 0 or any(bool(t.any()) for t in acc.values())
        with torch.no_grad():
            for name in self.omega:
                self.omega[name].copy_(state["omega"][name])
                self.anchors[name].copy_(state["anchors"][name])
            if open_task:
                for name, view in self.acc.items():
                    view.copy_(acc[name])
                self._commits.reset(self._acc, exact=True)
            else:
                self.release(staging=False)
        self._commits.flags, self._commits.pending = None, None
        for key in self.COUNTS:
            value = state.get(key, self.OPTIONAL.get(key))
            setattr(self, key, int(value.item() if isinstance(value, torch.Tensor) else value))


class Commits:
    """How a batch's numerators reach the accumulator: ``staging <- acc + weight * staging``, checked,
    then the two buffers swapped, so a rejected batch leaves the accumulator exactly as it was.

    :meth:`now` (CPU) checks at once and raises; :meth:`on_device` (CUDA)
    queues the check on the device and records a rejected batch in sticky
    device flags, read by :meth:`settle` (one host synchronization) and
    raised later by the state's ``check_finite``.
    """

    def __init__(self, specs: list, omega: "FlatBuffers"):
        self.specs = specs
        self.omega = omega
        self.totals: list[float] = []   # per acc buffer: an upper bound of its sum (immediate check)
        self.flags: dict | None = None  # device-side record of rejected batches (deferred check)
        self.pending: str | None = None  # a rejected batch's error, not yet raised

    def reset(self, acc: "FlatBuffers | None", exact: bool = False, zeros: bool = False) -> None:
        """Start the running-sum bounds from ``acc`` (None: no accumulator; ``zeros``: a new one, read
        nothing: no host synchronization)."""
        if acc is None:
            self.totals = []
        elif zeros:
            self.totals = [0.0] * len(acc.buffers)
        else:
            self.totals = [float(b.sum(dtype=torch.float64) if exact else b.sum()) for b in acc.buffers.values()]

    def now(self, staging: "FlatBuffers", acc: "FlatBuffers", weight: float) -> None:
        # The batch: a finite float32 sum proves every element finite (one reduction per buffer);
        # a non-finite one is a NaN/inf or an overflow of finite values, which float64 tells apart.
        sums = []
        for b in staging.buffers.values():
            s = float(b.sum())
            if not math.isfinite(s) and not math.isfinite(float(b.sum(dtype=torch.float64))):
                bad = staging.first_non_finite()
                raise FloatingPointError(
                    f"MAS: non-finite activations or gradients in layer {_layer(bad)!r} (parameter {bad!r}); "
                    "this batch was not added to the importance")
            sums.append(s)
        # The running sum: numerators are >= 0, so no element of acc + weight * batch exceeds the sum of
        # both totals; only when that bound nears float32's max is the new sum checked element-wise.
        totals = [t + weight * s for t, s in zip(self.totals, sums)]
        for (key, b), a in zip(staging.buffers.items(), acc.buffers.values()):
            torch.add(a, b, alpha=weight, out=b)
        if any(not t < 0.5 * _FLOAT32_MAX for t in totals) and not staging.all_finite():
            bad = staging.first_non_finite()
            raise FloatingPointError(
                f"MAS: the float32 sum of this task's importance overflows in layer {_layer(bad)!r} "
                f"(parameter {bad!r}); this batch was not added. Activations or gradients are too large: "
                "rescale the inputs, or consolidate() more often")
        acc.swap(staging)
        self.totals = [t if t < 0.5 * _FLOAT32_MAX else float(b.sum(dtype=torch.float64))
                       for t, b in zip(totals, acc.buffers.values())]

    def on_device(self, staging: "FlatBuffers", acc: "FlatBuffers", n: int, weight: float) -> None:
        # No host synchronization: everything below is queued on the device.
        flags = self._device_flags()
        for b, a in zip(staging.buffers.values(), acc.buffers.values()):
            torch.add(a, b, alpha=weight, out=b)  # the new sum, in the staging buffer
        # Per parameter, the largest |value| of the new sum: inf or NaN exactly when the batch had a
        # non-finite value there or the running sum overflowed (empty parameters cannot be either).
        bad = [(~torch.isfinite(torch.stack(torch._foreach_norm([staging[n] for n in names], float("inf")))))
               .to(flags["device"], non_blocking=True) for names in flags["groups"]]
        bad = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.bool, device=flags["device"])
        batch_bad = bad.any()
        for b, a in zip(staging.buffers.values(), acc.buffers.values()):
            torch.where(batch_bad.to(a.device, non_blocking=True), a, b, out=b)
        acc.swap(staging)
        first = batch_bad & ~flags["bad"]
        torch.where(first, bad, flags["params"], out=flags["params"])
        flags["bad"] |= batch_bad
        hit = batch_bad.to(torch.int64)
        flags["samples"].add_(hit, alpha=n)
        flags["batches"].add_(hit)

    def _device_flags(self) -> dict:
        if self.flags is None:
            device = next(iter(self.omega.buffers))[0] if self.omega.buffers else torch.device("cpu")
            groups: dict = {}
            for name, shape, dev, _ in self.specs:
                if math.prod(shape):
                    groups.setdefault(torch.device(dev), []).append(name)
            self.flags = {
                "device": device,
                "groups": list(groups.values()),
                "names": [n for names in groups.values() for n in names],  # the order of "params"
                "bad": torch.zeros((), dtype=torch.bool, device=device),
                "params": torch.zeros(sum(map(len, groups.values())), dtype=torch.bool, device=device),
                "samples": torch.zeros((), dtype=torch.int64, device=device),
                "batches": torch.zeros((), dtype=torch.int64, device=device),
            }
        return self.flags

    def settle(self) -> tuple[int, int]:
        """Read the device flags (one host synchronization): ``(samples, batches)`` rejected since."""
        flags = self.flags
        if flags is None:
            return 0, 0
        self.flags = None
        if not bool(flags["bad"]):
            return 0, 0
        names = flags["names"]
        bad = names[int(flags["params"].nonzero()[0, 0])] if bool(flags["params"].any()) else "?"
        if self.pending is None:
            self.pending = (
                f"MAS: a batch had non-finite activations or gradients, or made the float32 sum of the "
                f"importance overflow, in layer {_layer(bad)!r} (parameter {bad!r}); it was not added to the "
                f"importance ({int(flags['batches'])} batch(es), {int(flags['samples'])} samples left out; "
                "the other batches are kept)")
        return int(flags["samples"]), int(flags["batches"])

    def take_error(self) -> str | None:
        """The rejected batch's error message, once."""
        msg, self.pending = self.pending, None
        return msg

