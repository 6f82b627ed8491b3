"""One estimation session: hooks on the model while ``estimate()`` or ``accumulating()`` runs.

Data flows one way: a hook sees a batch -> its layout is observed (once per
call signature, ``estimators/layout.py``: where the samples are, N, every use
of every parameter) -> the estimator adds the batch's numerators into the
staging buffers -> on the first batch of a signature the self-check compares
the fast path with the per-sample definition (``estimators/verify.py``) ->
:meth:`ImportanceState.commit_batch` checks the numerators and moves them into
the task's accumulator (or rejects the whole batch). Hooks exist only while the
session is open, so training pays nothing for them.

What a batch is: one call of the model (``estimators/batch.py``); N is the
size of the dim where its input keeps its samples, as observed.

The estimators that run their own passes (the global rules, and the exact rule
for the parameters the local rule leaves uncovered), and the probe, replay the
model's call with the same arguments; while any session runs such a pass,
every session's hooks stay quiet, so two wrappers on one model never count each
other's passes. Only the thread that opened the session is counted: a forward
made by another thread (a training step beside the estimation) is not part of
the estimate.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ._model import modes, own_hook, remove_handles, requiring_grad
from .estimators import BatchEstimator, ExactEstimator, LocalEstimator, Plan
from .estimators.batch import Batch, Layouts
from .estimators.capture import LayoutChanged
from .estimators.layout import no_mha_fastpath
from .estimators.verify import Request, self_check
from .state import ImportanceState

_QUIET = threading.local()  # depth of own passes in this thread: hooks of every session stay quiet


def _quiet() -> bool:
    return getattr(_QUIET, "depth", 0) > 0


@contextlib.contextmanager
def own_passes():
    """The block's forward passes are a rule's own: no session's hooks count them."""
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


class Session:
    """Hooks of one estimation session.

    Args:
        module: the (unwrapped) model.
        params: the tracked parameters (``requires_grad`` is on for all of them while open).
        state: where batches go.
        estimator: a :class:`LocalEstimator` (runs inside the model's own forward) or an estimator with
            ``run(batch, staging, names)`` (runs its own passes).
        extra: for the local rule, the exact estimator and the names it estimates
            (the parameters no local rule covers), or None.
        handles: the list the hooks' handles go in (the owner removes them if
            it is garbage-collected mid-session).
        layouts: the session's observed layouts (``estimators/batch.py``).
        per_batch_mean: weight each batch's numerators by ``1/B`` (its sample
            count), for importance as a mean over batches of batch means.
        verify: the self-check: ``True`` (first batch of each call signature), ``"always"``, ``False``.
        output_fn: picks the output tensor (the self-check's per-sample losses).
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], state: ImportanceState, estimator,
                 extra: tuple[ExactEstimator, list[str]] | None, handles: list, layouts: Layouts,
                 per_batch_mean: bool = False, verify: bool | str = True, output_fn: Callable | None = None,
                 uncovered: str = "global"):
        self.module = module
        self.params = params
        self.state = state
        self.estimator = estimator
        self.extra = extra
        self.handles = handles
        self.layouts = layouts
        self.per_batch_mean = per_batch_mean
        self.verify = verify
        self.output_fn = output_fn
        self.uncovered = uncovered  # the local rule's policy for parameters its layers do not cover
        self._stray_warned: list[str] = []
        self._stack = contextlib.ExitStack()
        self._root: tuple[tuple, Batch] | None = None  # the model's call being seen (its args, its batch)
        self._verified: set[int] = set()  # the layouts the self-check passed on in this session
        self._thread = threading.get_ident()

    @property
    def local(self) -> bool:
        return isinstance(self.estimator, LocalEstimator)

    def open(self) -> "Session":
        if self.handles:
            raise RuntimeError("MAS: estimate()/accumulating() is already active on this wrapper")
        self._stack.enter_context(requiring_grad(self.params))
        try:
            # The fast path of nn.TransformerEncoderLayer / MultiheadAttention under no_grad bypasses the
            # submodules' forwards: their hooks would never see the batch.
            self._stack.enter_context(no_mha_fastpath())
            m = self.module
            self.handles.append(m.register_forward_pre_hook(own_hook(m, self._pre), with_kwargs=True))
            if self.local:
                self.handles.extend(self.estimator.hooks(lambda: self.state.staging, self._mine))
            self.handles.append(m.register_forward_hook(own_hook(m, self._post), with_kwargs=True,
                                                        always_call=True))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        remove_handles(self.handles)
        self._stack.close()

    def __enter__(self) -> "Session":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _checked(self) -> bool:
        """Whether the self-check runs on a batch whose layout is new (the exact rule's, with ``verify``)."""
        return bool(self.verify) and (isinstance(self.estimator, ExactEstimator)
                                      or (self.extra is not None and bool(self.extra[1])))

    def _mine(self) -> bool:
        """Whether a forward happening now is this session's to count (this thread, not a rule's own pass)."""
        return not _quiet() and threading.get_ident() == self._thread

    # ------------------------------------------------------------------ hooks
    def check(self) -> None:
        """The estimators' worded refusals of layers they cannot serve, before any forward pass."""
        if not self.local:
            self.estimator.check()
        elif self.extra is not None and self.extra[1]:
            self.extra[0].check()

    def _pre(self, module, args, kwargs) -> None:
        if self._root is not None or not self._mine():
            return  # a nested call of the model inside its own forward, a rule's own pass, another thread
        self.check()
        batch = Batch.of_call(self.module, args, kwargs)
        with own_passes():
            self.layouts.resolve(batch, self._checked)
        self._root = (args, batch)
        if self.local:
            self.state.begin_batch()
            self.estimator.begin(batch if batch.n else None)

    def _post(self, module, args, kwargs, output) -> None:
        if self._root is None or self._root[0] is not args or not self._mine():
            return
        batch = self._root[1]
        self._root = None
        if self.local:
            self.estimator.begin(None)
        if (output is None and sys.exc_info()[1] is not None) or not batch.n:
            return  # the forward raised, or an empty batch: not counted (its staging is zeroed by the next one)
        args, kwargs = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                (batch.args, batch.kwargs))
        replay = Batch.of_call(self.module, args, kwargs)
        replay.layout, replay.n = batch.layout, batch.n
        if self.local:
            self._finish_local(replay)
        else:
            self.state.begin_batch()
            self._run(self.estimator, replay, eval_mode=True)
            self.commit(replay.n)

    # ---------------------------------------------------------------- batches
    def _run(self, estimator, batch: Batch, eval_mode: bool, names: list[str] | None = None) -> None:
        check = None
        if isinstance(estimator, ExactEstimator) and self.verify and (
                self.verify == "always" or id(batch.layout) not in self._verified):
            check = Request(batch, list(self.params) if names is None else names, self.params)
        with own_passes(), modes(self.module, False if eval_mode else None):
            try:
                estimator.run(batch, self.state.staging, names, **({"check": check} if check else {}))
            except LayoutChanged:
                # The model's calls differ from the layout observed for this signature (data-dependent
                # control flow): observe this batch's, then run it again.
                self.layouts.forget(batch)
                self.state.begin_batch()
                self.layouts.resolve(batch, self._checked)
                if check is not None:
                    check = Request(batch, check.names, self.params)
                estimator.run(batch, self.state.staging, names, **({"check": check} if check else {}))
            if check is not None:
                with modes(self.module, False):
                    self_check(estimator, batch, check.names, self.params, self.output_fn, estimator.plan, check,
                               observe=self.layouts.observe)
                self._verified.add(id(batch.layout))

    def _finish_local(self, batch: Batch) -> None:
        """End a batch of the local rule: the uncovered parameters' exact rule, then the commit.

        A parameter used outside the layer whose local rule covers it (``emb.weight[ids]``, ``F.conv1d(x,
        conv.weight)``: ``layout.stray``) is uncovered too: that rule sees none of those uses (its
        numerators are dropped), and the ``uncovered=`` policy decides."""
        stray = sorted(n for n in (batch.layout.stray if batch.layout is not None else {}) if n in self.params)
        if stray:
            for n in stray:
                self.state.staging[n].zero_()
            where = {n: batch.layout.stray[n][:2] for n in stray}
            if self.uncovered == "error":
                raise ValueError(
                    f"MAS(importance='local', uncovered='error'): parameters {stray} are used outside the layers "
                    f"whose local rules cover them ({where}), so those "
                    "rules cannot see their use; pass uncovered='global' (exact per-sample rule for them) or "
                    "'skip' (zero importance)")
            if stray != self._stray_warned:
                self._stray_warned = stray
                warnings.warn(
                    f"MAS(importance='local'): parameters {stray} are used outside the layers whose local rules "
                    f"cover them ({where}); as uncovered={self.uncovered!r} "
                    f"says, they get {'the exact per-sample rule' if self.uncovered == 'global' else 'zero importance'}",
                    RuntimeWarning, stacklevel=2)
        if self.extra is not None:
            exact, names = self.extra
            names = list(names) + [n for n in stray if n not in names]
            if names:
                # Per-sample gradients need sample independence: eval mode, like the global rules.
                self._run(exact, batch, eval_mode=True, names=names)
        self.commit(batch.n)

    def commit(self, n: int) -> None:
        self.state.commit_batch(n, 1.0 / n if self.per_batch_mean and n else 1.0)

    def run_all(self, batches, call_for: Callable, eval_mode: bool, progress: bool, desc: str) -> None:
        """``estimate()``'s loop: each batch run as ``call_for(batch)`` says, with a progress bar if asked."""
        from tqdm.auto import tqdm

        if isinstance(batches, torch.Tensor):
            raise TypeError(
                f"MAS.estimate: got a tensor of shape {tuple(batches.shape)}; pass an iterable of batches, "
                "e.g. [x] for one batch, or a DataLoader"
            )
        if (isinstance(batches, (tuple, list)) and len(batches) > 1
                and all(isinstance(b, torch.Tensor) and b.dim() > 0 for b in batches)
                and len({(b.dim(), b.dtype) for b in batches}) > 1):
            shapes = ", ".join(f"{tuple(b.shape)} {str(b.dtype).replace('torch.', '')}" for b in batches)
            raise TypeError(
                f"MAS.estimate: got a {type(batches).__name__} of tensors of different ranks or dtypes "
                f"({shapes}), which looks like one (input, label) batch, not a list of batches; pass [batch] "
                "for one batch (its first item is the input), or a DataLoader"
            )
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
        # One iterator (tqdm would call iter() on the iterable twice: a DataLoader drawing two seeds, and
        # starting its workers twice).
        for batch in tqdm(iter(batches), total=total, disable=not progress, desc=desc, unit="batch"):
            self.run(call_for(batch), eval_mode=eval_mode)

    def run(self, call: Callable[[nn.Module], Any], eval_mode: bool = True) -> None:
        """One batch of ``estimate()``: ``call(model)`` runs the model on it.

        The local rule sees the model's own forward (under ``no_grad``); the
        other rules run their own passes on it (in eval mode unless told otherwise).
        """
        if self.local:
            # The layout observed before the forward (not from inside its pre-hook, where a sharded model's
            # own hooks are half-way through theirs); the forward then finds it known.
            with own_passes():
                self.layouts.resolve(Batch(self.module, call), self._checked)
            with torch.no_grad():
                call(self.module)
            return
        self.check()
        batch = Batch(self.module, call)
        with own_passes():
            self.layouts.resolve(batch, self._checked)
        if not batch.n:
            return  # an empty batch: nothing to add, and not counted as a batch
        self.state.begin_batch()
        self._run(self.estimator, batch, eval_mode)
        self.commit(batch.n)


def estimators_for(module: nn.Module, params: dict[str, nn.Parameter], plan: Plan, options, output_fn: Callable):
    """``(estimator, extra)`` for an estimation session as ``options`` say (``extra``: for the local rule, the
    exact estimator and the parameters no local rule covers, or None)."""
    def exact():
        forced = options.fallback_predicate()
        return ExactEstimator(module, params, plan, output_fn, options.memory_budget, options.chunk_size,
                              fallback=forced)

    if options.importance == "global_batch":
        return BatchEstimator(module, params, plan, output_fn), None
    if options.importance == "global":
        return exact(), None
    estimator = LocalEstimator(plan, options.post_activation)
    if options.uncovered == "skip":
        return estimator, None
    if options.uncovered == "global":  # also for parameters used outside their layers (seen by the probe)
        return estimator, (exact(), plan.uncovered)
    if not plan.uncovered:
        return estimator, None
    if options.uncovered == "error":
        raise ValueError(
            f"MAS(importance='local', uncovered='error'): no local rule covers {plan.uncovered}; "
            "pass uncovered='global' (exact per-sample rule) or 'skip' (zero importance)"
        )
    return estimator, (exact(), plan.uncovered)
