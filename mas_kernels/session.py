"""One estimation session: hooks on the model while ``estimate()`` or ``accumulating()`` runs.

Data flows one way: a hook sees a batch -> the rule adds the batch's
numerators into the staging buffers -> :meth:`ImportanceState.commit_batch`
checks them and moves them into the task's accumulator (or rejects the whole
batch). Hooks exist only while the session is open, so training pays nothing
for them.

What a batch is, and N: see ``estimators/batch.py`` (one call of the model;
dim 0 of its first tensor argument, or 1 for an unbatched sample).

The rules that run their own passes (the global rules, and the exact rule for
the parameters the local rule leaves uncovered) replay the model's call with
the same arguments; while any session runs such a pass, every session's hooks
stay quiet, so two wrappers on one model never count each other's passes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ._model import modes, own_hook, remove_handles, requiring_grad
from .estimators import BatchRule, ExactRule, LocalRule, Plan
from .estimators.batch import Batch, count_samples, first_tensor, same
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
        rule: a :class:`LocalRule` (runs inside the model's own forward) or a
            rule with ``run(forward, count, staging, ...)`` (runs its own passes).
        extra: for the local rule, the exact rule and the names it estimates
            (the parameters no local rule covers), or None.
        handles: the list the hooks' handles go in (the owner removes them if
            it is garbage-collected mid-session).
        per_batch_mean: weight each batch's numerators by ``1/B`` (its sample
            count), for importance as a mean over batches of batch means.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], state: ImportanceState, rule,
                 extra: tuple[ExactRule, list[str]] | None, handles: list, per_batch_mean: bool = False):
        self.module = module
        self.params = params
        self.state = state
        self.rule = rule
        self.extra = extra
        self.handles = handles
        self.per_batch_mean = per_batch_mean
        self._stack = contextlib.ExitStack()
        self._root: tuple[tuple, dict] | None = None  # the model's call being recorded
        self._reader: nn.Module | None = None  # the first layer that read its input
        self._n: int | None = None  # its sample count
        self._layout: int | None = None  # the dim of the input that holds them

    @property
    def local(self) -> bool:
        return isinstance(self.rule, LocalRule)

    def open(self) -> "Session":
        if self.handles:
            raise RuntimeError("MAS: estimate()/accumulating() is already active on this wrapper")
        self._stack.enter_context(requiring_grad(self.params))
        try:
            if hasattr(torch.backends, "mha") and hasattr(torch.backends.mha, "set_fastpath_enabled"):
                # The fast path of nn.TransformerEncoderLayer / MultiheadAttention under no_grad bypasses
                # the submodules' forwards: their hooks would never see the batch.
                was = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                self._stack.callback(torch.backends.mha.set_fastpath_enabled, was)
            m = self.module
            self.handles.append(m.register_forward_pre_hook(own_hook(m, self._pre), with_kwargs=True))
            for lm in self.rule.plan.modules():
                self.handles.append(lm.register_forward_pre_hook(own_hook(lm, self._layer_pre)))
            if self.local:
                self.handles.extend(self.rule.hooks(lambda: self.state.staging, lambda: not _quiet(), lambda: self._n))
            self.handles.append(m.register_forward_hook(own_hook(m, self._post), with_kwargs=True))
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

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args, kwargs) -> None:
        if self._root is not None or _quiet():
            return  # a nested call of the model inside its own forward, or a rule's own pass
        self._root = (args, kwargs)
        self._reader = None
        self._n = count_samples(args, kwargs)  # dim 0, until the first layer that reads the input says otherwise
        self._layout = None
        if self.local:
            self.state.begin_batch()

    def _layer_pre(self, module, args) -> None:
        """Notes the first layer that reads the model's input (it tells an unbatched sample)."""
        if self._root is not None and self._reader is None and args and same(args[0], first_tensor(*self._root)):
            self._reader = module
            layer = self.rule.plan.reader(module)
            self._n = count_samples(*self._root, layer)
            self._layout = layer.reads(args[0]) if args[0].dim() > 0 else None

    def _post(self, module, args, kwargs, output) -> None:
        if self._root is None or self._root[0] is not args or _quiet():
            return
        (args, kwargs), n, layout = self._root, self._n, self._layout
        self._root = self._reader = self._n = self._layout = None
        args, kwargs = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        batch = Batch.of_call(self.module, args, kwargs, n, layout)
        if self.local:
            self._finish_local(batch)
        else:
            self.state.begin_batch()
            self._run(self.rule, batch, eval_mode=True)
            self.commit(n)

    # ---------------------------------------------------------------- batches
    def _run(self, rule, batch: Batch, eval_mode: bool, names: list[str] | None = None) -> None:
        with own_passes(), modes(self.module, False if eval_mode else None):
            rule.run(batch, self.state.staging, names)

    def _finish_local(self, batch: Batch) -> None:
        """End a batch of the local rule: the uncovered parameters' exact rule, then the commit."""
        if self.extra is not None:
            exact, names = self.extra
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
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
        for batch in tqdm(batches, total=total, disable=not progress, desc=desc, unit="batch"):
            self.run(call_for(batch), eval_mode=eval_mode)

    def run(self, call: Callable[[nn.Module], Any], eval_mode: bool = True) -> None:
        """One batch of ``estimate()``: ``call(model)`` runs the model on it.

        The local rule sees the model's own forward (under ``no_grad``); the
        other rules run their own passes on it (in eval mode unless told otherwise).
        """
        if self.local:
            with torch.no_grad():
                call(self.module)
            return
        self.rule.check()
        batch = Batch(self.module, call)
        self.state.begin_batch()
        self._run(self.rule, batch, eval_mode)
        self.commit(batch.n)


def rules_for(module: nn.Module, params: dict[str, nn.Parameter], plan: Plan, options, output_fn: Callable):
    """``(rule, extra)`` for an estimation session as ``options`` say (``extra``: for the local rule, the
    exact rule and the parameters no local rule covers, or None)."""
    def exact():
        return ExactRule(module, params, plan, output_fn, options.memory_budget, options.chunk_size)

    if options.importance == "global_batch":
        return BatchRule(module, params, plan, output_fn), None
    if options.importance == "global":
        return exact(), None
    rule = LocalRule(plan, options.post_activation)
    if not plan.uncovered or options.uncovered == "skip":
        return rule, None
    if options.uncovered == "error":
        raise ValueError(
            f"MAS(importance='local', uncovered='error'): no local rule covers {plan.uncovered}; "
            "pass uncovered='global' (exact per-sample rule) or 'skip' (zero importance)"
        )
    return rule, (exact(), plan.uncovered)
