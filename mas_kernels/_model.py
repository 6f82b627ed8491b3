"""The model side of a MAS wrapper: the module under its wrappers, the tracked parameters, modes.

* :func:`unwrap` finds the user's module under DDP / DataParallel /
  ``torch.compile`` wrappers; parameter names are those of that module.
* :class:`TrackedParams` says which parameters are tracked and notices when
  that changes (a parameter or a submodule added, removed or replaced),
  without any per-step work: torch's global registration hooks mark every
  live watcher stale, and the next use re-reads ``named_parameters()``.
* :func:`modes` and :func:`requiring_grad` set module modes and
  ``requires_grad`` for a block and restore them after, whatever happens.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def default_output(out: Any) -> torch.Tensor:
    """The model's output itself, which must then be a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(
        f"MAS: the model returned a {type(out).__name__}; pass output_fn= to pick the output tensor "
        "whose squared L2 norm defines importance (e.g. output_fn=lambda out: out['logits'])"
    )


# Any module, anywhere, registering a parameter or a submodule marks every live
# watcher stale, so the training step needs no per-parameter check.
_LIVE: "weakref.WeakSet[TrackedParams]" = weakref.WeakSet()
_GLOBAL_HOOKS: list = []


def _mark_stale(*_args) -> None:
    for watch in list(_LIVE):
        watch.stale = True


def _install_global_hooks() -> None:
    if not _GLOBAL_HOOKS:
        from torch.nn.modules import module as _m

        _GLOBAL_HOOKS.append(_m.register_module_parameter_registration_hook(_mark_stale))
        _GLOBAL_HOOKS.append(_m.register_module_module_registration_hook(_mark_stale))


class TrackedParams:
    """The parameters of ``module`` a MAS tracks, by ``named_parameters()`` name.

    Args:
        module: the (unwrapped) model.
        include_frozen: also track parameters with ``requires_grad=False``.
    """

    def __init__(self, module: nn.Module, include_frozen: bool = False):
        self.module = module
        self.include_frozen = include_frozen
        self.stale = False
        self.params = self.read()
        _install_global_hooks()
        _LIVE.add(self)

    def read(self) -> dict[str, nn.Parameter]:
        """The tracked parameters as the module has them now."""
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad or self.include_frozen}

    def changed(self) -> dict[str, nn.Parameter] | None:
        """The new tracked parameters if any was added, removed or replaced since the last call, else None.

        Cheap when nothing was registered anywhere since (one flag).
        """
        if not self.stale:
            return None
        self.stale = False
        params = self.read()
        if list(params) == list(self.params) and all(params[n] is self.params[n] for n in params):
            return None
        self.params = params
        return params

    def forget(self) -> None:
        _LIVE.discard(self)


@contextlib.contextmanager
def modes(module: nn.Module, train: bool | None) -> Iterator[None]:
    """``module.train(train)`` for the block (nothing when ``train`` is None); every submodule's mode restored after."""
    if train is None:
        yield
        return
    saved = {m: m.training for m in module.modules()}
    try:
        module.train(train)
        yield
    finally:
        for m, training in saved.items():
            m.training = training


@contextlib.contextmanager
def requiring_grad(params: dict[str, nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on for every parameter in the block (frozen-but-tracked ones need a gradient path)."""
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])


def remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()



def own_hook(module: nn.Module, fn):
    """``fn`` as a hook of ``module`` only: on a copy of the module (``copy.deepcopy`` copies hooks along)
    it does nothing and removes itself from the copy."""
    home = weakref.ref(module)

    def hook(mod, *rest):
        if mod is not home():
            for d in (mod._forward_hooks, mod._forward_pre_hooks):
                for key in [k for k, h in d.items() if h is hook]:
                    del d[key]
                    mod._forward_hooks_with_kwargs.pop(key, None)
                    mod._forward_pre_hooks_with_kwargs.pop(key, None)
                    getattr(mod, "_forward_hooks_always_called", {}).pop(key, None)
            return None
        return fn(mod, *rest)

    return hook
