r"""Every use of every tracked parameter, observed at the op level.

A per-layer rule sees what a layer does with its parameters inside its own
``forward``. A model can use a parameter elsewhere too: ``F.linear(x,
self.fc.weight)`` in a parent's forward, a functional LM head ``h @
self.wte.weight.T``, a parametrization (``weight_norm``) whose original
parameters reach ``F.linear`` through a derived weight. :class:`UseTracker`
finds them: a ``TorchFunctionMode`` that sees every torch function call of one
forward pass (a sub-batch of the probe, so it costs little), with

* *data*: tensors that depend on the model's input (the input's tensors, and
  every result of an op with a data argument);
* *derived*: tensors computed from tracked parameters alone (``w.T``,
  ``w.to(bf16)``, ``g * v / ||v||``), each with the parameters it comes from,
  except those computed inside the forward of a layer whose rule covers them
  (a position embedding of constant ids: its rule sees the layer's output);
* a *use*: an op that takes a parameter (or a tensor derived from it) together
  with data. It is *covered* when it runs inside the forward of a layer whose
  rule covers that parameter (the module stack is kept by hooks); any other use
  is *stray*, and the parameter's exact importance then comes from the
  per-sample fallback (one backward per sample), which is exact for any use.
"""

from __future__ import annotations

import threading
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .layout import call_leaves, tensor_leaves


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", "")
    if name == "__get__" and qual:
        return qual.rsplit(".", 1)[0]  # a property: Tensor.T
    return name


# Ops that take rows of a tensor at given positions (with a data tensor as the positions: rows the data chose).
_SELECT = frozenset({torch.Tensor.__getitem__, torch.index_select, torch.Tensor.index_select, torch.masked_select,
                     torch.Tensor.masked_select, torch.take, torch.Tensor.take, torch.take_along_dim,
                     torch.Tensor.take_along_dim, torch.gather, torch.Tensor.gather})


class UseTracker(TorchFunctionMode):
    """The stray uses of ``params`` during the block (see the module docstring).

    Args:
        model: the model (its submodules' forwards are tracked as a stack).
        params: tracked name -> parameter.
        covering: tracked name -> the modules whose rules cover that parameter.
        inputs: the tensors of the model's input (the data).
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], covering: dict[str, Iterable[nn.Module]],
                 inputs: Iterable[torch.Tensor]):
        super().__init__()
        self.model = model
        self.params = {n: params[n] for n in params}  # params[n]: the tensor the forward uses (FSDP2's)
        self.by_id = {id(p): n for n, p in self.params.items()}
        self.covering = {n: {id(m) for m in ms} for n, ms in covering.items()}
        self.names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self.derived = WeakIdKeyDictionary()
        self.data = WeakIdKeyDictionary()
        for t in inputs:
            self.data[t] = True
        self.stack: list[int] = []
        # rows the data chose: results of indexing a data tensor by a data tensor (``h[mask]``,
        # ``x[x[:, 0].argsort()]``, ``index_select(h, 0, idx)``), and the layer calls that read one
        # (module id, call index): their rows are not the batch's samples in order, whatever their shapes
        self.selected = WeakIdKeyDictionary()
        self.gathered: set[tuple[int, int]] = set()
        self._calls: dict[int, int] = {}
        self._thread = threading.get_ident()
        self.stray: dict[str, list[str]] = {}
        self.used: set[str] = set()
        self._handles: list = []

    def _sources(self, leaves) -> tuple[set, bool]:
        names, data = set(), False
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                continue
            n = self.by_id.get(id(t))
            if n is not None and self.params[n] is t:
                names.add(n)
            elif t in self.derived:
                names |= self.derived[t]
            elif t in self.data:
                data = True
        return names, data

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names, data = self._sources(call_leaves(args, kwargs))
        if not names and not data:
            return out
        outs = tensor_leaves(out)
        if data:
            for t in outs:
                self.data[t] = True
            if func in _SELECT and self._chosen_by_data(args, kwargs):
                for t in outs:
                    self.selected[t] = True
            if names:
                self.used |= names
                where = self.names.get(self.stack[-1], "?") if self.stack else "the model's caller"
                for n in names:
                    if not (self.covering.get(n, set()) & set(self.stack)):
                        self.stray.setdefault(n, []).append(f"{_op_name(func)} in {where}")
        else:
            # Computed from parameters alone inside the forward of a layer whose rule covers them: the rule
            # accounts for them through that layer's output (its output gradient), wherever it goes.
            names = {n for n in names if not (self.covering.get(n, set()) & set(self.stack))}
            for t in outs:
                got = names | set(self.derived.get(t, ()))
                if got:
                    self.derived[t] = frozenset(got)
                elif t in self.derived:
                    del self.derived[t]
        return out

    def _chosen_by_data(self, args, kwargs) -> bool:
        """Whether an indexing op takes rows of a data tensor at positions a data tensor says."""
        if not args or not isinstance(args[0], torch.Tensor) or args[0] not in self.data:
            return False
        return any(isinstance(t, torch.Tensor) and t in self.data for t in call_leaves(args[1:], kwargs))

    # ---------------------------------------------------------- module stack
    def __enter__(self):
        # Two global module hooks (filtered to the model's modules) instead of two per module: a large
        # model's hundreds of registrations cost more than the sub-batch's run.
        self._handles.append(register_module_forward_pre_hook(self._push))
        self._handles.append(register_module_forward_hook(self._pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def _push(self, module, args):
        # another thread's forward is not this run
        if id(module) in self.names and threading.get_ident() == self._thread:
            self.stack.append(id(module))
            i = self._calls.get(id(module), 0)
            self._calls[id(module)] = i + 1
            if any(isinstance(t, torch.Tensor) and t in self.selected for t in tensor_leaves(args)):
                self.gathered.add((id(module), i))

    def _pop(self, module, args, output):
        if threading.get_ident() == self._thread and self.stack and self.stack[-1] == id(module):
            self.stack.pop()
