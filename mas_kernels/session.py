"""One estimation session: hooks on the model while ``estimate()`` or ``accumulating()`` runs.

Data flows one way: a hook sees a batch -> the rule adds the batch's
numerators into the staging buffers -> :meth:`ImportanceState.commit_batch`
checks them and moves them into the task's accumulator (or rejects the whole
batch). Hooks exist only while the session is open, so training pays nothing
for them; the rule's own forward passes (the global rules) run with the hooks
muted, so they are not counted twice.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._model import modes, remove_handles, requiring_grad
from .estimators import ExactRule, LocalRule
from .state import ImportanceState


class Session:
    """Hooks of one estimation session.

    Args:
        module: the (unwrapped) model.
        params: the tracked parameters (``requires_grad`` is on for all of them while open).
        state: where batches go.
        rule: a :class:`LocalRule` (runs inside the model's own forward) or a
            rule with ``run(x, staging)`` (runs its own passes on each batch's input).
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
        self.busy = False  # inside the rule's own passes: hooks stay quiet
        self._grad = contextlib.ExitStack()

    @property
    def local(self) -> bool:
        return isinstance(self.rule, LocalRule)

    def _active(self) -> bool:
        return not self.busy

    def open(self) -> "Session":
        if self.handles:
            raise RuntimeError("MAS: estimate()/accumulating() is already active on this wrapper")
        self._grad.enter_context(requiring_grad(self.params))
        try:
            if self.local:
                self.handles.extend(self.rule.hooks(self.state.staging, self._active))
                self.handles.append(self.module.register_forward_pre_hook(self._pre))
            self.handles.append(self.module.register_forward_hook(self._post))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        remove_handles(self.handles)
        self._grad.close()

    def __enter__(self) -> "Session":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args) -> None:
        if not self.busy:
            self.state.begin_batch()

    def _post(self, module, args, output) -> None:
        if self.busy or not args:
            return
        x = args[0].detach()
        if self.local:
            self.finish_local(x)
        else:
            self.observe(x)

    # ---------------------------------------------------------------- batches
    def finish_local(self, x: torch.Tensor) -> None:
        """End a batch of the local rule: the uncovered parameters' exact rule, then the commit."""
        if self.extra is not None:
            exact, names = self.extra
            # Per-sample gradients need sample independence: eval mode, like the global rules.
            self.busy = True
            try:
                with modes(self.module, False):
                    exact.run(x, self.state.staging, names)
            finally:
                self.busy = False
        self.commit(int(x.shape[0]))

    def commit(self, n: int) -> None:
        self.state.commit_batch(n, 1.0 / n if self.per_batch_mean and n else 1.0)

    def observe(self, x: torch.Tensor, eval_mode: bool = True) -> None:
        """One batch for a rule that runs its own passes (in eval mode unless told otherwise)."""
        self.busy = True
        try:
            with modes(self.module, False if eval_mode else None):
                self.state.begin_batch()
                self.rule.run(x, self.state.staging)
                self.commit(int(x.shape[0]))
        finally:
            self.busy = False
