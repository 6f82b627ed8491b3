"""The model side of a MAS wrapper: the module under its wrappers, the tracked parameters, modes.

* :func:`unwrap` finds the user's module under DDP / DataParallel /
  ``torch.compile`` wrappers; parameter names are those of that module.
* :class:`TrackedParams` says which parameters are tracked (a user filter,
  ``requires_grad``) and notices when that changes (a parameter or a
  submodule added, removed or replaced) at almost no per-step cost: torch's
  global registration hooks mark every live watcher stale, a deleted module
  breaks one of the links it keeps, and the next use re-reads
  ``named_parameters()``.
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
    """The user's module under DDP / DataParallel / ``torch.compile`` / DeepSpeed engine wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


# Submodules that wrappers insert into a model's tree (activation checkpointing's CheckpointWrapper,
# a block compiled alone): they are not part of a parameter's name, so a state saved from the bare model
# loads into the wrapped one and back.
WRAPPER_KEYS = ("_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``name`` without wrapper segments: ``h.0._checkpoint_wrapped_module.attn.weight`` -> ``h.0.attn.weight``."""
    if "_checkpoint_wrapped_module" not in name and "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_KEYS)


def named_parameters(module: nn.Module):
    """``module.named_parameters()`` with wrapper segments left out of the names (:func:`clean_name`)."""
    for name, p in module.named_parameters():
        yield clean_name(name), p


def _entry(d, key):
    """``d.get(key)`` for a module's ``_modules`` / ``_parameters``, also a TorchScript module's (an
    ``OrderedDictWrapper``, which has no ``get``)."""
    return d[key] if key in d else None


def _descend(mod: nn.Module, key: str | None, links: dict) -> nn.Module:
    """Step through wrapper submodules of ``mod`` until one has ``key`` (a child; None: ``mod`` itself)."""
    while key is None or key not in mod._modules:
        inner = next((mod._modules[w] for w in WRAPPER_KEYS if w in mod._modules), None)
        if inner is None:
            return mod
        w = next(w for w in WRAPPER_KEYS if w in mod._modules)
        links[(id(mod), w)] = (mod, w, inner, type(inner))
        mod = inner
        if key is None:
            return mod
    return mod


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
        keep: names tracked before (frozen since, they stay tracked).
        select: which parameters to track: a callable ``(name, param) -> bool``
            or a collection of names (each must name a parameter of the model:
            an unknown one raises ``ValueError`` naming it); ``None``: all.

    A parameter is tracked when ``select`` accepts it and it requires grad (or
    ``include_frozen``); once tracked it stays tracked while the model holds
    it, also when it is frozen later (its importance is kept for when it is
    unfrozen).

    What notices a change: parameters or submodules *registered* anywhere
    (torch's global registration hooks mark every live watcher stale, no
    per-step work); a submodule *deleted* or replaced on the path to a
    tracked parameter (:meth:`changed` compares, per module on those paths,
    one dict entry with what it was: ``del model[2]`` is noticed on the next
    use); a parameter removed from its module (:meth:`changed` with
    ``full=True``, at the wrapper's non-step entry points).
    """

    def __init__(self, module: nn.Module, include_frozen: bool = False, select=None, keep=()):
        self.module = module
        self.include_frozen = include_frozen
        self.select = _selector(module, select, include_frozen)
        self.stale = False
        self.params: dict[str, nn.Parameter] = dict.fromkeys(keep)  # tracked before (a copy's original)
        self.params = self.read()
        self._links, self._owners = self._paths()
        _install_global_hooks()
        _LIVE.add(self)

    def read(self) -> dict[str, nn.Parameter]:
        """The tracked parameters as the module has them now."""
        keep, select = self.params, self.select
        return {name: p for name, p in named_parameters(self.module)
                if (p.requires_grad or self.include_frozen or name in keep) and select(name, p)}

    def _paths(self) -> tuple[list, list]:
        """(parent, key, child) for every module on the path to a tracked parameter, and
        (owner's parameter dict, key, parameter) for every tracked parameter."""
        links: dict = {}
        owners = []
        self._root_type = type(self.module)
        for name, p in self.params.items():
            *path, leaf = name.split(".")
            mod = self.module
            for key in path:
                mod = _descend(mod, key, links)
                child = _entry(mod._modules, key)
                if child is None:  # not reachable by its name (should not happen for named_parameters names)
                    break
                links[(id(mod), key)] = (mod, key, child, type(child))
                mod = child
            if leaf not in mod._parameters:
                mod = _descend(mod, None, links)
            owners.append((mod._parameters, leaf, p))
        return list(links.values()), owners

    def intact(self, full: bool = False) -> bool:
        """Whether every module on the paths to the tracked parameters is still where it was, of the class
        it was (FSDP2's ``fully_shard`` changes a module's class when it swaps in sharded parameters)
        (``full``: and every tracked parameter too)."""
        if type(self.module) is not self._root_type:
            return False
        for mod, key, child, cls in self._links:
            if _entry(mod._modules, key) is not child or type(child) is not cls:
                return False
        if full:
            for params, key, p in self._owners:
                if _entry(params, key) is not p:
                    return False
        return True

    def changed(self, full: bool = True) -> dict[str, nn.Parameter] | None:
        """The new tracked parameters if any was added, removed or replaced since the last call, else None.

        Cheap when nothing was registered anywhere since: one flag, one dict look-up per module on the paths
        to the tracked parameters, and (``full``, the default) one per tracked parameter, which notices a
        parameter replaced without registration (``module._parameters["weight"] = Parameter(...)``:
        accelerate's ``set_module_tensor_to_device``, ``model.half()`` under
        ``torch.__future__.set_overwrite_module_params_on_conversion(True)``).
        """
        if not self.stale and self.intact(full):
            return None
        self.stale = False
        params = self.read()
        if list(params) == list(self.params) and all(params[n] is self.params[n] for n in params):
            self._links, self._owners = self._paths()
            return None
        self.params = params
        self._links, self._owners = self._paths()
        return params

    def forget(self) -> None:
        _LIVE.discard(self)


def _selector(module: nn.Module, select, include_frozen: bool):
    """``select`` as a ``(name, param) -> bool`` callable, names checked against ``module``."""
    if select is None:
        return _everything
    if callable(select):
        return select
    if isinstance(select, (str, bytes)) or not hasattr(select, "__iter__"):
        raise ValueError(f"MAS: params= must be a callable (name, param) -> bool or a list of parameter names, "
                         f"got {type(select).__name__} {select!r}")
    names = list(select)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"MAS: params= lists {bad!r}, which are not parameter names (strings)")
    have = dict(named_parameters(module))
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ValueError(f"MAS: params= names {unknown}, which the model does not have; its parameters are "
                         f"{list(have)[:8]}{' ...' if len(have) > 8 else ''}")
    frozen = [n for n in names if not have[n].requires_grad and not include_frozen]
    if frozen:
        raise ValueError(f"MAS: params= names {frozen}, which have requires_grad=False; pass include_frozen=True "
                         "to track frozen parameters")
    return _Names(names)


def _everything(name: str, p) -> bool:
    return True


class _Names:
    """A selection by name (a class, not a closure, so that a wrapper using it can be pickled)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def __call__(self, name: str, p) -> bool:
        return name in self.names


@contextlib.contextmanager
def modes(module: nn.Module, train: bool | None) -> Iterator[None]:
    """``module.train(train)`` for the block (nothing when ``train`` is None); every submodule's mode restored after."""
    if train is None:
        yield
        return
    saved = {m: m.training for m in module.modules()}
    if all(t == train for t in saved.values()):  # already so (the estimators' own passes inside estimate())
        yield
        return
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
    it does nothing and removes itself from the copy. Never traced by ``torch.compile`` (a compiled model
    runs the hook eagerly, at a graph break: estimation sessions observe and replay the model)."""
    home = weakref.ref(module)

    def hook(mod, *rest):
        if mod is not home():
            for d in (mod._forward_hooks, mod._forward_pre_hooks):
                for key in [k for k, h in d.items() if h is registered]:
                    del d[key]
                    mod._forward_hooks_with_kwargs.pop(key, None)
                    mod._forward_pre_hooks_with_kwargs.pop(key, None)
                    getattr(mod, "_forward_hooks_always_called", {}).pop(key, None)
            return None
        return fn(mod, *rest)

    registered = torch.compiler.disable(hook, recursive=True)
    return registered


class CheckedOutput:
    """A user's ``output_fn``, whose result must be one tensor (a class, so a wrapper using it can be pickled)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, out: Any) -> torch.Tensor:
        y = self.fn(out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"MAS: output_fn returned a {type(y).__name__}; it must return one tensor, whose "
                            "squared L2 norm defines importance (e.g. output_fn=lambda out: out[0], or "
                            "torch.cat(...) of several)")
        return y
