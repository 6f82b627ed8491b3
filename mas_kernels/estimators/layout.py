r"""Where every tensor keeps its samples: observed by running the model, never guessed from sizes.

A per-sample rule needs, for each tensor it reads, the dim that holds the
batch's samples. Sizes alone cannot say it: a ``(T, N)`` input of a
sequence-first model, a ``(T, T)`` mask or relative-position ids with
``T == N``, an expert capacity equal to N all have a dim of size N that holds
no samples. So the layout of a call of the model is *observed*, once per call
signature (:func:`signature`), by :func:`probe`:

1. **Where the input keeps its samples.** The model runs on a sub-batch ``S``
   of 1-3 samples taken along a candidate dim of its input (dim 0 first, then
   the others; ``sample_dim=`` says it outright). A dim is the sample dim when
   the model's output on the sub-batch equals the rows ``S`` of its output on
   the whole batch (``F(x_S) == F(x)_S``): samples along that dim are
   independent, and the output dim that followed the sub-batch's size is the
   output's sample dim. ``S`` never starts at 0, so a causal model sliced along
   time (whose first positions do not depend on the rest) is caught. Other
   input tensors are sliced along a dim of the same size, or kept whole when
   only that makes the outputs agree (a ``(T, T)`` mask with ``T == N``).
   When no dim makes them agree although the model runs, the samples are
   *coupled* (expert-choice routing, batch-level pooling): per-sample
   importance is not defined and the exact rule refuses by name.
2. **Where every layer's tensors keep them.** Each recorded layer call's
   arguments and outputs are compared between the whole batch (N samples) and
   the sub-batch (s samples): the one dim whose size went from N to s holds
   the samples; a dim that went from ``N*p`` to ``s*p`` holds ``p`` rows per
   sample (a flattened ``(N*T, D)``); a tensor with no such dim is shared by
   the batch (position ids ``(1, T)``, T5's relative-position buckets); any
   other change (two dims, an unrelated size) is :data:`UNKNOWN`, and that
   layer's parameters get the per-sample fallback.

A rule that is wrong for a model anyway cannot stay silent: the self-check
(``verify.py``) compares the fast path on the sub-batch with the per-sample
definition on the first batch of each signature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import types
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclasses.dataclass(frozen=True)
class Flat:
    """A dim that holds consecutive rows per sample (a flattened ``(N*T, ...)``: sample-major); ``per``:
    how many when observed (a later batch may have another T: the rows per sample are then its size / N)."""

    dim: int
    per: int


class _Unknown:
    """A tensor whose samples could not be located (more than one dim followed the batch size, or a size
    unrelated to it): its layer's parameters get the per-sample fallback."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
SampleDim = Any  # int | Flat | None (shared by the batch) | UNKNOWN


def rows(d, idx: torch.Tensor, per: int | None = None) -> torch.Tensor:
    """The indices along ``d`` of the samples ``idx`` (``per``: rows per sample of a flattened dim)."""
    if isinstance(d, Flat):
        per = per or d.per
        return (idx.unsqueeze(1) * per + torch.arange(per, device=idx.device)).reshape(-1)
    return idx


def take(t, d, idx: torch.Tensor, n: int | None = None):
    """The samples ``idx`` of ``t`` (which keeps them in ``d``; ``n``: the batch's sample count, for the rows
    per sample of a flattened dim); ``t`` itself when it is shared (``d`` None)."""
    if d is None or not isinstance(t, torch.Tensor):
        return t
    if isinstance(d, Flat):
        per = t.shape[d.dim] // n if n else d.per
        return t.index_select(d.dim, rows(d, idx.to(t.device), per))
    return t.index_select(d, idx.to(t.device))


def batched(t: torch.Tensor, n: int, feature_dims: int, d) -> torch.Tensor:
    """``t`` as ``(N, T, *features)`` with samples first: ``feature_dims`` trailing dims are features, every
    other dim a position within the sample. ``d`` None: the tensor is the batch's one sample (N == 1), or
    shared by every sample (broadcast, a view: no copy)."""
    feats = tuple(t.shape[t.dim() - feature_dims:]) if feature_dims else ()
    if d is None:
        one = t.reshape(1, -1, *feats)
        return one if n == 1 else one.expand(n, *one.shape[1:])
    if d is UNKNOWN:
        raise ValueError("MAS: internal: a per-sample rule was given a tensor whose samples are unknown")
    if isinstance(d, Flat):
        t = t.unflatten(d.dim, (n, -1))
        d = d.dim
    if d != 0:
        t = t.movedim(d, 0)
    return t.reshape(n, -1, *feats)


@dataclasses.dataclass
class CallDims:
    """Where one call of a layer keeps its samples: per tensor leaf of ``(args, kwargs)`` (tree_flatten
    order; non-tensors None) and per tensor output; ``expand``: the output dim to broadcast to the batch in
    the recorded pass (a shared call whose output every sample uses)."""

    ins: tuple
    outs: tuple
    expand: int | None = None
    rows: bool = False  # a call on a subset of the samples: its rows along dim 0 are samples of their own

    @property
    def x(self):
        """The sample dim of the first argument."""
        return self.ins[0] if self.ins else None

    @property
    def out(self):
        return self.outs[0] if self.outs else None

    @property
    def shared(self) -> bool:
        """No argument and no output holds samples: the call serves the whole batch at once."""
        return all(d is None for d in self.ins) and all(d is None for d in self.outs)

    @property
    def known(self) -> bool:
        return not any(d is UNKNOWN for d in self.ins + self.outs)


@dataclasses.dataclass
class Layout:
    """What :func:`probe` observed about one call signature of the model.

    ``inputs``: the sample dim of each leaf of the model call's ``(args, kwargs)`` (None: shared or not a
    tensor); ``output``: that of the output tensor (None: it has none, UNKNOWN: not observed);
    ``calls``: per recorded module, the :class:`CallDims` of each of its calls in order; ``coupled``: why
    the samples are not independent (None when they are); ``stray``: parameter name -> the ops that use it
    outside the layers whose rules cover it (from ``uses.py``); ``check``: the sub-batch's sample indices.
    """

    inputs: list
    output: SampleDim
    calls: dict = dataclasses.field(default_factory=dict)
    coupled: str | None = None
    stray: dict = dataclasses.field(default_factory=dict)
    check: list = dataclasses.field(default_factory=list)
    single: bool = False  # observed on one sample: it serves batches of one only
    unsliced: bool = False  # the model ran on no sub-batch: its samples are not slices of its arguments
    notes: dict = dataclasses.field(default_factory=dict)  # what the estimators derived from it (cached)

    def n(self, args: tuple, kwargs: dict) -> int:
        """N of a call with this layout: the size of the first batched input's sample dim (1: unbatched)."""
        for t, d in zip(call_leaves(args, kwargs), self.inputs):
            if isinstance(t, torch.Tensor) and d is not None:
                size = t.shape[d.dim if isinstance(d, Flat) else d]
                return size // d.per if isinstance(d, Flat) else int(size)
        return 1

    def subset(self, args: tuple, kwargs: dict, idx) -> tuple[tuple, dict]:
        """The call's arguments restricted to the samples ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return with_leaves(args, kwargs, [take(t, d, idx) for t, d in zip(call_leaves(args, kwargs), self.inputs)])

    def dims_of(self, module: nn.Module, i: int) -> CallDims | None:
        got = self.calls.get(id(module))
        return got[i] if got is not None and i < len(got) else None


def tensor_leaves(tree) -> list[torch.Tensor]:
    """The tensors of ``tree`` in ``tree_flatten`` order (a bare tensor, the usual output, without the walk)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


_PLAIN = (type(None), bool, int, float, str)  # leaves of a pytree, as tensors are


def _plain(values) -> bool:
    return all(isinstance(v, torch.Tensor) or type(v) in _PLAIN for v in values)


def call_leaves(args: tuple, kwargs: dict) -> list:
    """The leaves of ``(args, kwargs)`` in ``tree_flatten`` order (no walk in the usual case: tensors and plain
    values, no containers)."""
    if type(args) is tuple and _plain(args) and (not kwargs or (type(kwargs) is dict and _plain(kwargs.values()))):
        return [*args, *kwargs.values()] if kwargs else list(args)
    return tree_flatten((args, kwargs))[0]


def with_leaves(args: tuple, kwargs: dict, leaves: list) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with their leaves (in :func:`call_leaves` order) replaced by ``leaves``: the inverse
    of :func:`call_leaves` (no walk in the usual case)."""
    if type(args) is tuple and _plain(args) and (not kwargs or (type(kwargs) is dict and _plain(kwargs.values()))):
        k = len(args)
        return tuple(leaves[:k]), (dict(zip(kwargs, leaves[k:])) if kwargs else kwargs)
    return tree_unflatten(list(leaves), tree_flatten((args, kwargs))[1])


def signature(args: tuple, kwargs: dict) -> tuple:
    """What makes two calls of the model share a layout: the argument structure, each tensor's rank, dtype
    and device type, and the plain values of non-tensor arguments (``use_cache=False``...)."""
    leaves, spec = tree_flatten((args, kwargs))
    key = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            key.append(("T", v.dim(), v.dtype, v.device.type))
        elif v is None or isinstance(v, (bool, int, float, str)):
            key.append(v)
        else:
            key.append(type(v).__name__)
    return (str(spec), tuple(key))


def check_indices(m: int) -> list[int]:
    """1-3 sample indices of a dim of size ``m``, never starting at 0 (a causal model's first positions
    depend on nothing before them) and never the whole dim."""
    return sorted({1, m // 2, m - 1} - {0}) if m > 1 else []


def _tol(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-2
    return 2e-4


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` equals ``b`` up to the round-off of computing it on another batch size (relative to ``b``'s
    largest magnitude; integer tensors exactly)."""
    return same_many([(a, b)])[0]


def same_many(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """:func:`same_values` of every pair, with one host synchronization for the floating ones."""
    result: list = [None] * len(pairs)
    stats, at = [], []
    for i, (a, b) in enumerate(pairs):
        if a.shape != b.shape:
            result[i] = False
        elif not (a.dtype.is_floating_point or a.dtype.is_complex):
            result[i] = bool(torch.equal(a, b))
        elif a.numel() == 0:
            result[i] = True
        else:
            wide = torch.promote_types(a.dtype, torch.float32)  # the tolerance is far above float32's round-off
            # Both maxima finite exactly when every value of both is (a NaN or an infinity anywhere reaches
            # one of them, through a - b or |b|).
            stats += [(a.detach().to(wide) - b.detach().to(wide)).abs().max(), b.detach().to(wide).abs().max()]
            at.append(i)
    if stats:
        values = torch.stack([v.to(stats[0].device, torch.float64) for v in stats]).tolist()
        for j, i in enumerate(at):
            diff, scale = values[2 * j], values[2 * j + 1]
            a, b = pairs[i]
            if math.isfinite(diff) and math.isfinite(scale):
                result[i] = diff <= _tol(a.dtype) * max(scale, 1e-30)
            else:
                wide = torch.promote_types(a.dtype, torch.float32)
                result[i] = bool(torch.equal(a.detach().to(wide).nan_to_num(), b.detach().to(wide).nan_to_num()))
    return result


def dim_between(full: tuple, sub: tuple, n: int, s: int):
    """The sample dim of one tensor from its shapes on N samples (``full``) and on s samples (``sub``)."""
    if tuple(full) == tuple(sub):
        return None
    if len(full) != len(sub):
        return UNKNOWN
    changed = [d for d in range(len(full)) if full[d] != sub[d]]
    if len(changed) != 1:
        return UNKNOWN
    d = changed[0]
    f, g = full[d], sub[d]
    if f == n and g == s:
        return d
    if f % n == 0 and f > n and g == s * (f // n):
        return Flat(d, f // n)
    return UNKNOWN


_NONE = object()


@contextlib.contextmanager
def no_mha_fastpath():
    """``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``'s fast path off during the block: under
    ``no_grad`` in eval mode it bypasses the submodules' forwards (and so their wrappers and hooks; forward
    hooks alone would turn it off, wrappers do not)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


class Forwards:
    """Wrappers put in place of modules' ``forward`` (an instance attribute over the class's method), removed
    in reverse order by :meth:`restore`.

    Why not forward hooks: a module with any hook runs ``nn.Module.__call__``'s slow path (~15-20 us per call
    of a small layer, registering and removing the hooks each pass on top), which a wrapper called from the
    fast path does not. A wrapper sees what the forward itself gets and returns: the arguments after every
    forward pre-hook, the output before any forward hook (another library's hook that replaces the output
    changes what the model computes after the layer, not what the layer's rule reads)."""

    def __init__(self):
        self._saved: list = []

    def wrap(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """``module.forward = make(module.forward)`` until :meth:`restore`.

        Bound to the module, so that a copy made during the pass (``copy.deepcopy`` binds a bound method to
        the copy) runs its own class's forward, never this module's through the wrapper."""
        d = module.__dict__  # "forward" is no parameter, buffer or submodule: nn.Module.__setattr__'s checks skipped
        old = d.get("forward", _NONE)
        self._saved.append((d, old))
        inner = make(module.forward)

        def forward(m, *args, **kwargs):
            if m is module:
                return inner(*args, **kwargs)
            return type(m).forward(m, *args, **kwargs)  # a copy of the module made while the wrapper was on

        d["forward"] = types.MethodType(forward, module)

    def restore(self) -> None:
        for d, old in reversed(self._saved):
            if old is _NONE:
                d.pop("forward", None)
            else:
                d["forward"] = old
        self._saved.clear()


class _Record:
    """Forward wrappers on ``modules`` that keep each call's tensor shapes (nothing else) during one run, and
    which module first read the model's input."""

    def __init__(self, modules: list[nn.Module], expand: dict | None = None, n: int = 1, keep: bool = False):
        self.modules = modules
        self.keep = keep
        self.calls: dict[int, list] = {id(m): [] for m in modules}
        # each call's tensors (its arguments' and outputs', None for other leaves): their values are compared
        # between the batch and the sub-batch (``Prober._calls``)
        self.tensors: dict[int, list] = {id(m): [] for m in modules}
        self.first: list = []  # (module, first argument) of the first calls, to find the input's reader
        self.expand = expand or {}  # (module id, call index) -> dim: the output broadcast to n samples
        self.n = n
        self.thread = threading.get_ident()

    def hook(self, module, args, kwargs, output):
        if threading.get_ident() != self.thread:
            return None  # another thread's forward of the same model
        calls = self.calls[id(module)]
        d = self.expand.get((id(module), len(calls)))
        new = None
        if d is not None:
            args, output = expand_call(args, output, d, self.n)
            new = output
        leaves = call_leaves(args, kwargs)
        out_leaves = tensor_leaves(output)
        ins = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves)
        outs = tuple(tuple(t.shape) for t in out_leaves)
        calls.append((ins, outs))
        if self.keep:
            self.tensors[id(module)].append(([t if isinstance(t, torch.Tensor) else None for t in leaves], out_leaves))
        return new

    def pre(self, module, args):
        if len(self.first) < 64 and threading.get_ident() == self.thread:
            self.first.append((module, args[0] if args else None))

    def __enter__(self):
        self.forwards = Forwards()
        self.fastpath = no_mha_fastpath()
        self.fastpath.__enter__()
        for m in self.modules:
            self.forwards.wrap(m, self._recording(m))
        return self

    def _recording(self, m: nn.Module) -> Callable:
        def make(own):
            def forward(*args, **kwargs):
                self.pre(m, args)
                out = own(*args, **kwargs)
                new = self.hook(m, args, kwargs, out)
                return out if new is None else new
            return forward
        return make

    def __exit__(self, *exc):
        self.forwards.restore()
        self.fastpath.__exit__(None, None, None)


def expand_call(args: tuple, output, d: int, n: int):
    """A shared call's output (and first argument, where it has size 1 in ``d``) broadcast to ``n`` samples
    along ``d``, so that every sample's share of the output gradient is kept apart (a position embedding's
    ``(1, T)`` ids: each sample's rows of the gradient, not their sum)."""
    def grow(t):
        return t.expand(*t.shape[:d], n, *t.shape[d + 1:])

    if isinstance(output, torch.Tensor) and output.dim() > d and output.shape[d] == 1:
        output = grow(output)
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > d and args[0].shape[d] == 1:
        args = (grow(args[0]),) + tuple(args[1:])
    return args, output


class ProbeFailed(Exception):
    """The model could not run on a sub-batch taken this way."""


def _substitute(module: nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook that hands the model's first (outermost) call ``(args, kwargs)`` instead of its own."""
    done = []

    def pre(m, a, kw):
        if done:
            return None
        done.append(True)
        return args, kwargs

    return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)


class Prober:
    """Runs the observations of one call signature (see the module docstring).

    Args:
        module: the model.
        run: ``run()`` runs the batch as the user's ``forward=`` does; the model's outermost call inside
            it is the one observed (its arguments are replaced by a sub-batch's).
        pick: ``pick(result)``: the output tensors of a run (the first is the one ``output_fn`` picks).
        modules: the layers whose calls the rules read.
        sample_dim: the user's statement of where the input keeps its samples (``MAS(sample_dim=)``): an
            int for the first tensor argument, or a dict from keyword name / positional index to a dim
            (None: shared by the batch); None: observe.
        api: ``api(module, x)``: where the layer ``module`` keeps the samples of its input ``x`` by its
            API: ``"unbatched"`` (a 1-D input of a Linear, a (C, H, W) input of a Conv2d), a dim (an RNN's
            ``batch_first``), or None (no say). Asked of the first layer that reads the model's input.
        tracker: ``tracker(inputs)``: a :class:`~.uses.UseTracker` for a run on ``inputs``, or None.
        expandable: ``expandable(module)``: whether a shared call of ``module`` should be tried broadcast
            to the batch (its layer has a per-sample rule), or None.
        agree: ``agree(flag) -> flag`` makes a decision the same on every rank of a sharded model (whose
            forward passes are collectives, so every rank must run the same probe): the flag AND-ed over
            the ranks. Default: this process's own.
        checked: whether the self-check runs on this batch right after (``verify.py``): its single-sample
            runs are then the second look at whether the samples are independent.
        by_value: compare each layer call's tensors between the batch and the sub-batch (``_rows_checked``;
            the exact rule's per-sample rows): the batch's run then keeps them until the comparison (its
            activations, once per signature), which the local and batch rules, summing over rows, need not.
    """

    def __init__(self, module: nn.Module, run: Callable[[], Any], pick: Callable, modules: list[nn.Module],
                 sample_dim=None, api: Callable | None = None, tracker: Callable | None = None,
                 expandable: Callable | None = None, agree: Callable[[bool], bool] | None = None,
                 checked: bool = False, by_value: bool = False):
        self.agree = agree or (lambda flag: flag)
        self.checked = checked
        self.by_value = by_value
        self.module = module
        self.run = run
        self.pick = pick
        self.modules = modules
        self.sample_dim = sample_dim
        self.api = api
        self.tracker = tracker
        self.expandable = expandable

    # ----------------------------------------------------------------- runs
    def _run(self, args, kwargs, expand=None, n=1, tracker=None):
        rec = _Record(self.modules, expand, n, keep=self.by_value)
        handle = _substitute(self.module, args, kwargs)
        try:
            with rec, torch.no_grad(), (tracker if tracker is not None else contextlib.nullcontext()):
                out = self.pick(self.run())
        finally:
            handle.remove()
        return out, rec

    def _sub(self, args, kwargs, dims: list, idx: list[int], expand=None, track=False):
        t = torch.as_tensor(idx, dtype=torch.long)
        sliced = [take(v, d, t) for v, d in zip(call_leaves(args, kwargs), dims)]
        sub_args, sub_kwargs = with_leaves(args, kwargs, sliced)
        tracker = None
        if track and self.tracker is not None:
            tracker = self.tracker([v for v, d in zip(sliced, dims) if isinstance(v, torch.Tensor)])
        try:
            out, rec = self._run(sub_args, sub_kwargs, expand, len(idx), tracker)
        except Exception as exc:  # noqa: BLE001 - any failure means: not a way to take a sub-batch
            raise ProbeFailed(f"{type(exc).__name__}: {exc}") from exc
        return out, rec, tracker

    # --------------------------------------------------------------- inputs
    def _user_dims(self, args, kwargs, leaves) -> dict[int, Any]:
        """Leaf index -> dim, from ``sample_dim=``."""
        sd = self.sample_dim
        if sd is None:
            return {}
        tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        if isinstance(sd, int):
            return {tensors[0]: sd} if tensors else {}
        spans, pos = {}, 0
        for k, a in enumerate(args):
            m = len(tree_flatten(a)[0])
            spans[k] = range(pos, pos + m)
            pos += m
        for name, v in kwargs.items():
            m = len(tree_flatten(v)[0])
            spans[name] = range(pos, pos + m)
            pos += m
        out = {}
        for key, d in sd.items():
            if key not in spans:
                raise ValueError(f"MAS: sample_dim names {key!r}, which is not an argument of the model's call "
                                 f"(positional 0..{len(args) - 1}, keywords {sorted(kwargs)})")
            for i in spans[key]:
                if isinstance(leaves[i], torch.Tensor):
                    if d is not None and not 0 <= d < leaves[i].dim():
                        raise ValueError(f"MAS: sample_dim={{{key!r}: {d}}} is not a dim of that argument of "
                                         f"shape {tuple(leaves[i].shape)}")
                    out[i] = d
        return out

    @staticmethod
    def _natural(leaves, first: int, d0: int, n: int, fixed: dict) -> list:
        """Sample dims for every leaf: the first tensor's ``d0``; another tensor the same dim when its size
        is N there, else its first dim of size N, else shared (``fixed``: the user's)."""
        dims = [None] * len(leaves)
        for i, v in enumerate(leaves):
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if i in fixed:
                dims[i] = fixed[i]
            elif i == first:
                dims[i] = d0
            elif v.dim() > d0 and v.shape[d0] == n:
                dims[i] = d0
            else:
                dims[i] = next((d for d in range(v.dim()) if v.shape[d] == n), None)
        return dims

    def observe(self, args: tuple, kwargs: dict) -> Layout:
        """The layout of the call ``model(*args, **kwargs)`` (the batch ``run`` runs)."""
        self._tracked = None  # (input dims, UseTracker) of the sub-run that tracked parameter uses
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        if not tensors:
            raise TypeError("MAS: the model was called without a tensor argument, so its samples cannot be "
                            "counted; pass the input as a tensor (positional or keyword)")
        full, rec_full = self._run(args, kwargs)
        fixed = self._user_dims(args, kwargs, leaves)
        # The first tensor argument the user did not call shared: a flat input with offsets (an EmbeddingBag's)
        # keeps its samples in the offsets, sample_dim={0: None, 1: 0}.
        first = next((i for i in tensors if fixed.get(i, 0) is not None), None)
        if first is None:
            raise ValueError("MAS: sample_dim says every tensor argument of the model is shared by the batch; "
                             "name the argument that holds the samples, and its dim")
        x = leaves[first]
        said = self._first_reader(rec_full, x)
        if first in fixed:
            candidates = [fixed[first]]
        else:
            candidates = list(range(x.dim()))
            if isinstance(said, int) and 0 <= said < x.dim():  # the reader's API first (an RNN's batch_first)
                candidates = [said] + [d for d in candidates if d != said]
        tried: list = []
        best = None  # (dims, n, idx, sub, rec_sub, out_dim, consistent)
        dim0 = None  # what became of the first candidate (the convention, or the user's): ran, or None
        for k, d0 in enumerate(candidates):
            n = int(x.shape[d0])
            if n == 1:  # one sample along this dim: nothing to tell apart, nothing to refute
                best = (self._natural(leaves, first, d0, 1, fixed), 1, [], None, None, None, True)
                break
            found = self._inputs_along(leaves, args, kwargs, first, d0, n, check_indices(n), fixed, full, tried)
            if found is not None and found[-1]:
                best = found
                break
            if k == 0:
                dim0 = found
        if best is None and first not in fixed and said == "unbatched":
            best = ([None] * len(leaves), 1, [], None, None, None, True)
        unobserved = None
        if best is None and x.dim() == 0:
            best = ([None] * len(leaves), 1, [], None, None, None, True)
        if best is None:
            # Nothing made the outputs agree: samples along the first candidate (dim 0, or the user's) by
            # convention, and the exact rule refuses (coupled samples, or a model no sub-batch runs on).
            d0 = candidates[0]
            if dim0 is not None:
                best = dim0
            else:
                n = int(x.shape[d0])
                best = (self._natural(leaves, first, d0, n, fixed), n, check_indices(n), None, None, UNKNOWN, False)
                why = "; ".join(f"along dim {d}: {e}" for d, e in tried[:3])
                unobserved = (f"the model did not run on a sub-batch of its samples ({why}), so where its "
                              "layers keep them cannot be observed")
        dims, n, idx, sub, rec_sub, out_dim, consistent = best
        coupled = None
        if not consistent:
            coupled = unobserved or (
                f"the model's output for samples {idx} of a sub-batch differs from their output in the whole "
                f"batch (samples along dim {dims[first]} of the input of shape {tuple(x.shape)} are not "
                "independent: expert-choice routing, batch-level pooling; or the samples are kept in another dim; "
                "or forward= combines the model's output with other tensors of the batch, which it must not: "
                "it is also run on sub-batches)")
            if first not in fixed:
                warnings.warn(f"MAS: {coupled}; N counts along dim {dims[first]} of the input. Pass sample_dim= "
                              "to say where the samples are", RuntimeWarning, stacklevel=2)
        layout = Layout(inputs=dims, output=out_dim if n > 1 else None, coupled=coupled, check=list(idx),
                        single=n == 1, unsliced=unobserved is not None)
        self._calls(layout, n, idx, rec_full, rec_sub if rec_sub is not None or n == 1 else _Record([]))
        if n > 1 and consistent:
            self._expansions(layout, args, kwargs, full, n, idx)
        if self.tracker is not None and consistent:
            if n > 1 and self._tracked is not None and self._tracked[0] == list(dims):
                tracker = self._tracked[1]
            elif n > 1:
                _, _, tracker = self._sub(args, kwargs, dims, idx, self._expand_map(layout), track=True)
            else:
                tracker = self.tracker([v for v in leaves if isinstance(v, torch.Tensor)])
                self._run(args, kwargs, tracker=tracker)
            layout.stray = tracker.stray
            for mid, i in tracker.gathered:  # rows the data chose (see UseTracker.selected): not samples in order
                calls = layout.calls.get(mid)  # (nor one sample each: an expert's rows are tokens)
                if calls is not None and i < len(calls):
                    calls[i] = CallDims(tuple(UNKNOWN for _ in calls[i].ins) or (UNKNOWN,),
                                        tuple(UNKNOWN for _ in calls[i].outs) or (UNKNOWN,))
        return layout

    def _inputs_along(self, leaves, args, kwargs, first, d0, n, idx, fixed, full, tried):
        """The sub-batch along ``d0``, other leaves along their natural dims, then each other leaf in turn
        shared or along another dim of size N: the first that makes the outputs agree, else the first that
        ran with an output that followed the sub-batch's size, else None."""
        natural = self._natural(leaves, first, d0, n, fixed)
        options = [natural]
        for i, v in enumerate(leaves):
            if i == first or i in fixed or not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            for a in [None] + [d for d in range(v.dim()) if v.shape[d] == n]:
                if a != natural[i]:
                    options.append(natural[:i] + [a] + natural[i + 1:])
        ran = None
        for dims in options[:12]:
            try:
                # The first try also tracks the uses of parameters (it is the one accepted, nearly always).
                sub, rec_sub, tracker = self._sub(args, kwargs, dims, idx, track=self._tracked is None)
                if tracker is not None:
                    self._tracked = (list(dims), tracker)
            except ProbeFailed as exc:
                tried.append((d0, str(exc)[:200]))
                continue
            out_dim, consistent = _agree(full, sub, n, idx)
            consistent = self.agree(consistent)
            if consistent and n > 2 and not (self.checked and out_dim is not None and out_dim is not UNKNOWN):
                # A second sub-batch, with sample 0 and of another size: routing that couples samples can
                # leave one sub-batch's outputs unchanged by chance, rarely two. Not when the self-check
                # runs on this batch next (``checked``) and the output's sample dim is known: it runs two of
                # the samples alone (sub-batches of one) and compares their outputs with the batch's, which
                # refuses coupled samples by name as this would.
                other = sorted({0, n // 2})
                try:
                    sub2, _, _ = self._sub(args, kwargs, dims, other)
                    consistent = _agree(full, sub2, n, other)[1]
                except ProbeFailed:
                    consistent = False
                consistent = self.agree(consistent)
            got = (dims, n, idx, sub, rec_sub, out_dim, consistent)
            if consistent:
                return got
            if ran is None and out_dim is not None and out_dim is not UNKNOWN:
                ran = got
            tried.append((d0, "the sub-batch's outputs differ from the batch's"))
        return ran

    def _first_reader(self, rec: _Record, x: torch.Tensor):
        """What the first layer that reads the input says of it by its API (see ``api``), or None."""
        if self.api is None:
            return None
        for module, a in rec.first:
            if a is x or (isinstance(a, torch.Tensor) and a.shape == x.shape and a.data_ptr() == x.data_ptr()):
                return self.api(module, a)
        return None

    # ---------------------------------------------------------------- layers
    def _calls(self, layout: Layout, n: int, idx: list, rec_full: _Record, rec_sub: _Record | None) -> None:
        """Each recorded call's dims from its shapes on N and on s samples."""
        self._shapes = {(id(m), i): c for m in self.modules for i, c in enumerate(rec_full.calls[id(m)])}
        if n == 1 or rec_sub is None:  # one sample: every tensor is that sample's
            for m in self.modules:
                layout.calls[id(m)] = [CallDims(tuple(None for _ in ins), tuple(None for _ in outs))
                                       for ins, outs in rec_full.calls[id(m)]]
            return
        s = len(idx)
        observed = {}  # module id -> (its calls' dims from their shapes, its calls' shapes on N and on s)
        for m in self.modules:
            a, b = rec_full.calls[id(m)], rec_sub.calls.get(id(m))
            if b is None or len(a) != len(b):
                layout.calls[id(m)] = [CallDims((UNKNOWN,), (UNKNOWN,)) for _ in a]
                continue
            got = []
            for (ins_f, outs_f), (ins_s, outs_s) in zip(a, b):
                if len(ins_f) != len(ins_s) or len(outs_f) != len(outs_s):
                    got.append(CallDims((UNKNOWN,), (UNKNOWN,)))
                    continue
                ins = tuple(None if f is None and g is None else
                            UNKNOWN if f is None or g is None else dim_between(f, g, n, s)
                            for f, g in zip(ins_f, ins_s))
                outs = tuple(dim_between(f, g, n, s) for f, g in zip(outs_f, outs_s))
                got.append(CallDims(ins, outs))
            observed[id(m)] = (got, a, b)
        by_value = []  # the modules whose calls the value comparison changed
        if self.by_value:  # every module's comparisons at once: one host synchronization for the whole model
            checked = self._rows_checked({k: (got, rec_full.tensors[k], rec_sub.tensors[k])
                                          for k, (got, _, _) in observed.items()}, n, idx)
            for k, got in checked.items():
                if got is not observed[k][0]:
                    by_value.append(k)
                    observed[k] = (got,) + observed[k][1:]
        for k, (got, a, b) in observed.items():
            layout.calls[k] = _subsets(got, a, b, n, s)
        if self.by_value and not self.agree(not by_value) and not by_value:
            # Another rank of a sharded model found rows out of order (its data): the same layout on every
            # rank, so no call here counts its rows as samples either (one decision, one collective).
            for m in self.modules:
                layout.calls[id(m)] = [c if c.shared or not c.known else
                                       CallDims(tuple(UNKNOWN if d is not None else None for d in c.ins),
                                                tuple(UNKNOWN if d is not None else None for d in c.outs))
                                       for c in layout.calls[id(m)]]

    @staticmethod
    def _rows_checked(calls: dict, n: int, idx: list) -> dict:
        """Per module (``calls``: id -> (its calls' dims, their tensors on N, on s samples)), the dims of each call
        whose values say otherwise set to UNKNOWN (the module's list itself when none does): a tensor's sample
        dim holds the samples in order only if the sub-batch's tensor is the batch's rows ``idx`` there, and a
        tensor shared by the batch is the same in both runs. Shapes alone cannot see rows reordered (a batch
        sorted by length, ``layer(x[perm])``), selected by the data (token-choice experts: ``expert(h[mask])``)
        or flattened time-major (``out.view(T * N, H)`` of a sequence-first RNN): such a call's parameters get
        the per-sample fallback, never another sample's rows. Every comparison of the model in one
        :func:`same_many` (one host synchronization)."""
        t_idx = torch.as_tensor(idx, dtype=torch.long)
        pairs, where = [], []
        for key, (got, full, sub) in calls.items():
            for j, c in enumerate(got):
                if not c.known:
                    continue
                (ins_f, outs_f), (ins_s, outs_s) = full[j], sub[j]
                for side, dims, fs, ss in (("ins", c.ins, ins_f, ins_s), ("outs", c.outs, outs_f, outs_s)):
                    for k, (d, f, g) in enumerate(zip(dims, fs, ss)):
                        if isinstance(f, torch.Tensor) and isinstance(g, torch.Tensor) and f.numel() and g.numel():
                            pairs.append((g, take(f, d, t_idx, n)))
                            where.append((key, j, side, k))
        bad: dict = {}
        for (key, j, side, k), ok in zip(where, same_many(pairs)):
            if not ok:
                bad.setdefault(key, set()).add((j, side, k))
        out = {}
        for key, (got, _, _) in calls.items():
            marks = bad.get(key)
            if not marks:
                out[key] = got
                continue
            out[key] = [CallDims(tuple(UNKNOWN if (j, "ins", k) in marks else d for k, d in enumerate(c.ins)),
                                 tuple(UNKNOWN if (j, "outs", k) in marks else d for k, d in enumerate(c.outs)))
                        if any(w[0] == j for w in marks) else c for j, c in enumerate(got)]
        return out

    @staticmethod
    def _expand_map(layout: Layout) -> dict:
        return {(mid, i): c.expand for mid, cs in layout.calls.items() for i, c in enumerate(cs)
                if c.expand is not None}

    def _expansions(self, layout: Layout, args, kwargs, full, n: int, idx: list) -> None:
        """Shared calls of layers with per-sample rules, broadcast to the batch where that leaves the
        model's output unchanged (observed on the sub-batch); the others stay shared."""
        if self.expandable is None:
            return
        todo = {}
        for m in self.modules:
            if not self.expandable(m):
                continue
            for i, c in enumerate(layout.calls[id(m)]):
                if c.shared and c.outs:
                    todo[(id(m), i)] = c
        if not todo:
            return
        plan = {}
        for key, c in todo.items():
            # the dim of size 1 where the input's samples would be: the first one of the output
            shape = self._out_shape(key)
            if shape is not None:
                d = next((k for k, size in enumerate(shape) if size == 1), None)
                if d is not None:
                    plan[key] = d
        if not plan:
            return
        try:
            sub, _, _ = self._sub(args, kwargs, layout.inputs, idx, plan)
            ok = _agree(full, sub, n, idx)[1]
        except ProbeFailed:
            ok = False
        if not self.agree(ok):
            return
        for key, d in plan.items():
            c = todo[key]
            c.expand = d
            c.outs = (d,) + tuple(c.outs[1:])
            if c.ins and c.ins[0] is None and self._in_shape(key) is not None and self._in_shape(key)[d:d + 1] == (1,):
                c.ins = (d,) + tuple(c.ins[1:])

    def _out_shape(self, key):
        got = self._shapes.get(key)
        return got[1][0] if got and got[1] else None

    def _in_shape(self, key):
        got = self._shapes.get(key)
        return got[0][0] if got and got[0] else None


def _agree(full: list, sub: list, n: int, idx: list) -> tuple:
    """``(output dim, whether the sub-batch's outputs are the batch's rows idx)``: every output tensor that
    follows the sub-batch in one dim must hold the same values there, and at least one must; outputs the
    whole batch shares (a batch loss beside the logits) are not compared."""
    if not full or len(full) != len(sub):
        return UNKNOWN, False
    t = torch.as_tensor(idx)
    dims = []
    for f, g in zip(full, sub):
        d = dim_between(tuple(f.shape), tuple(g.shape), n, len(idx))
        if d is UNKNOWN or (d is not None and not same_values(g, take(f, d, t))):
            return (dims[0] if dims else d), False
        dims.append(d)
    return dims[0], any(d is not None for d in dims)


def _subsets(got: list[CallDims], full: list, sub: list, n: int, s: int) -> list[CallDims]:
    """Calls of one layer on disjoint subsets of the samples (a multi-task model's head per task,
    ``head(h[task == t])``): every call's tensors changed in dim 0 only, each call's rows fewer than N and
    together at most N (at most s in the sub-batch). Each row is then one sample, and each call a batch
    of its own (``CallDims.rows``); anything else stays UNKNOWN."""
    if all(c.known for c in got) or not got:
        return got
    rows_f, rows_s = [], []
    for (ins_f, outs_f), (ins_s, outs_s) in zip(full, sub):
        shapes = [(f, g) for f, g in zip(ins_f + outs_f, ins_s + outs_s) if f is not None and g is not None]
        changed = {d for f, g in shapes if len(f) == len(g) for d in range(len(f)) if f[d] != g[d]}
        if changed - {0} or any(len(f) != len(g) for f, g in shapes) or not shapes:
            return got
        firsts = {(f[0], g[0]) for f, g in shapes if f and f[0] != g[0]}
        if len(firsts) > 1:
            return got
        f0, g0 = firsts.pop() if firsts else (shapes[0][0][0], shapes[0][1][0])
        rows_f.append(f0)
        rows_s.append(g0)
    if sum(rows_f) > n or sum(rows_s) > s or not all(r < n for r in rows_f):
        return got
    out = []
    for c, (ins_f, outs_f), (ins_s, outs_s) in zip(got, full, sub):
        ins = tuple(None if f is None else (0 if f and g and f[0] != g[0] else None)
                    for f, g in zip(ins_f, ins_s))
        outs = tuple(0 if f and f[0] != g[0] else None for f, g in zip(outs_f, outs_s))
        out.append(CallDims(ins, outs, rows=True))
    return out
