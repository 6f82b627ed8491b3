r"""``torch.optim`` optimizers whose step applies the MAS penalty in the same pass over memory.

.. code-block:: python

    mas = mk.MAS(model, lam=1.0)
    ...                                  # mas.estimate(loader); mas.consolidate()
    opt = mk.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, mas=mas)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                       # = mas.add_penalty_grad_(); torch.optim.AdamW.step()
        opt.last_penalty                 # lam * sum Omega (theta - theta*)^2 before the step (no host sync)

Each step is the torch optimizer's step with the gradient

.. math:: g = \nabla_\theta L_{\text{task}} + 2 \lambda\, \Omega \odot (\theta - \theta^*)

(``lam``, ``Omega`` and ``theta*`` are the wrapper's, read at each step:
``mas.lam = ...`` and ``consolidate()`` take effect at the next one), in one
pass over memory: the penalty gradient is added in registers, never written
to ``.grad`` (which stays as ``backward()`` left it). In float32 an AdamW step
then moves 36 bytes per parameter instead of 20 (``add_penalty_grad_``) + 28
(a fused AdamW step). Kernels: native C++ on CPU, Triton on CUDA, the PyTorch
definition elsewhere (``mas_kernels.ops.optim_step``).

Why subclasses of ``torch.optim.Adam``/``AdamW``/``SGD``, not ``mas.fused_step(optimizer)``:
the step belongs to the optimizer, and everything around a training loop
calls ``optimizer.step()`` (LR schedulers, ``GradScaler``, Lightning,
transformers' Trainer, Avalanche) and recognizes ``isinstance(opt,
torch.optim.AdamW)``. A subclass whose param groups, state and
``state_dict()`` are the torch optimizer's own (built by torch's own
``_init_group``) is a drop-in: nothing around it changes, and a state saved
by one loads into the other and continues identically.

Conventions (the same as ``mas.add_penalty_grad_()`` followed by the torch step):

* the penalty gradient is part of the gradient before anything else: it goes
  into Adam's moments, SGD's momentum, and ``maximize`` negates it with the rest;
* weight decay: ``AdamW`` (and ``Adam(decoupled_weight_decay=True)``) scale
  theta by ``1 - lr wd`` (decoupled); ``Adam`` and ``SGD`` add ``wd * theta``
  to the gradient (coupled, L2), after the penalty gradient;
* which parameters: those with a ``.grad`` (as torch.optim). After the first
  ``consolidate()``, a parameter the wrapper tracks that requires grad but has
  no ``.grad`` (unused in this forward, e.g. another task's head) gets a zero
  ``.grad`` first, as ``add_penalty_grad_()`` gives it, so the penalty still
  pulls it back to theta*; a frozen parameter (``requires_grad=False``)
  without ``.grad`` is skipped. Parameters the wrapper does not track get the
  plain update. Before the first ``consolidate()`` every step is the plain one;
* :attr:`last_penalty`: ``lam * sum Omega (theta - theta*)^2`` over the
  tracked parameters this step updated, at the values it started from (a
  0-dim float32 tensor on the parameters' device; 0 before the first task);
* gradient clipping, if any, happens before the step and so before the
  penalty: ``clip_grad_norm_(model.parameters(), c); opt.step()`` clips the
  task gradient and adds the penalty gradient unclipped. (To clip the sum,
  use the two-pass form: ``add_penalty_grad_()``, clip, the torch step: the
  norm needs the penalty gradient, an extra read of theta, theta* and Omega.)

``torch.compile``: the step runs eagerly inside a compiled function (``torch.compiler.disable``:
a graph break around ``opt.step()``), so no value of ``lr``, ``lam`` or the step count ever
recompiles anything. There is nothing for a compiler to fuse in it (it is one multi-tensor
kernel per parameter kind already), and Dynamo's handling of ``torch.optim`` (marking groups
capturable, moving the step counts to the GPU) does not fit its CPU-hosted step counts. (The ops
themselves, ``torch.ops.mas_kernels.adam_penalty_step_`` / ``sgd_penalty_step_``, trace into a
graph like any custom op, but Dynamo guards on their float arguments, as on the penalty ops':
called inside a compiled function with a new ``lr`` they would recompile.)

Flags: ``amsgrad``, ``maximize``, ``nesterov``, ``dampening`` and
``foreach`` are accepted (``foreach`` chooses nothing here: every step is one
multi-tensor kernel); ``fused=True``, ``capturable=True`` and
``differentiable=True`` are refused by name. Loading a ``state_dict`` saved by
a fused or capturable torch optimizer converts it (those flags are reset and
the step counts moved to the CPU; the values are unchanged). Sparse and
complex parameters are refused. Parameters of a dtype the kernels do not
handle (float64) run the PyTorch definition, in their own precision.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ops.optim_step import adam_penalty_step_torch, sgd_penalty_step_torch

__all__ = ["Adam", "AdamW", "SGD"]

_REFUSED = {
    "fused": "this optimizer's step is already one fused pass (leave fused unset)",
    "capturable": "CUDA graph capture is not supported (the step counts live on the CPU)",
    "differentiable": "the fused step is not differentiable",
}


def _refuse(who: str, **flags) -> None:
    for flag, value in flags.items():
        if value:
            raise ValueError(f"mk.optim.{who}: {flag}={value!r} is not supported: {_REFUSED[flag]}")


def _scalar(x) -> float:
    """A hyperparameter as a Python float (a tensor one is read on the host: keep it on the CPU)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _as_ours(who: str, state_dict: dict) -> dict:
    """A ``state_dict`` of any torch optimizer of the same kind as this one can load: ``fused`` and
    ``capturable`` reset (values unchanged); ``differentiable`` refused. The caller's dict is not changed."""
    groups = []
    for i, g in enumerate(state_dict["param_groups"]):
        if g.get("differentiable"):
            raise ValueError(f"mk.optim.{who}.load_state_dict: param_groups[{i}] was saved with differentiable=True, "
                             f"which is not supported: {_REFUSED['differentiable']}")
        g = dict(g)
        if g.get("fused"):
            g["fused"] = None
        if g.get("capturable"):
            g["capturable"] = False
        groups.append(g)
    return {**state_dict, "param_groups": groups}


# What the fused kernels take; float64 runs the PyTorch definition (in float64).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

class _PenaltyStep:
    """What the three optimizers share: the wrapper, the lists of each step, the step's loop over param
    groups (each optimizer's ``_group_step`` updates one group and returns its penalty), ``load_state_dict``."""

    mas: Any
    last_penalty: torch.Tensor | None

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step (see the module docstring); returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reg, positions, lam = self._penalty_lists()
        total = None
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
            if reg is not None:
                self._give_zero_grads(group, positions)
            value = self._group_step(gi, group, reg, positions, lam)
            if value is not None:
                total = _sum(total, value)
        self._add_value(total, reg)
        return loss

    def _init_mas(self, mas) -> None:
        if not callable(getattr(mas, "_step_regularizer", None)):
            raise TypeError(f"mk.optim.{type(self).__name__}: mas must be an mk.MAS, got {type(mas).__name__}")
        self.mas = mas
        self.last_penalty = None

    # Optimizer.__getstate__ keeps only defaults, state and param_groups: keep the wrapper too.
    def __getstate__(self):
        return {**super().__getstate__(), "mas": self.mas, "last_penalty": None}

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim``'s, accepting the state of the torch optimizer of the same kind (also a
        fused or capturable one: see the module docstring)."""
        super().load_state_dict(_as_ours(type(self).__name__, state_dict))
        for st in self.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor) and (step.device.type != "cpu" or step.dtype != torch.float32):
                st["step"] = step.to(device="cpu", dtype=torch.float32)

    def _check_group(self, i: int, group: dict) -> None:
        for flag in _REFUSED:
            if group.get(flag):
                raise ValueError(f"mk.optim.{type(self).__name__}: param_groups[{i}][{flag!r}]=True is not "
                                 f"supported: {_REFUSED[flag]}")

    def _penalty_lists(self):
        """``(regularizer or None, {param: index}, lam)`` for this step."""
        reg = self.mas._step_regularizer()
        if reg is None:
            return None, {}, 0.0
        if reg.local is not None:
            raise ValueError(f"mk.optim.{type(self).__name__}: the wrapper's penalty works on local shards, "
                             "which the fused step does not support")
        return reg, reg.positions(), reg.lam

    @staticmethod
    def _give_zero_grads(group: dict, positions: dict) -> None:
        """A zero ``.grad`` for tracked parameters that require grad and have none (as ``add_penalty_grad_``)."""
        for p in group["params"]:
            if p.grad is None and p.requires_grad and p in positions:
                p.grad = torch.zeros_like(p)

    @staticmethod
    def _partition(params: list[torch.Tensor], positions: dict) -> dict[tuple, list[int]]:
        """Indices of ``params`` per (device, tracked, kernel dtype): one kernel call each (usually one or two)."""
        parts: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            parts.setdefault((p.device, p in positions, p.dtype in _KERNEL_DTYPES), []).append(i)
        return parts

    def _add_value(self, value: torch.Tensor | None, reg) -> None:
        if value is None:
            value = reg.zero() if reg is not None else torch.zeros((), dtype=torch.float32)
        self.last_penalty = value


def _pick(xs: list, idx: list[int], n: int) -> list:
    return list(xs) if len(idx) == n else [xs[i] for i in idx]


def _state_lists(reg, positions: dict, params: list, idx: list[int], tracked: bool) -> tuple[list, list]:
    """theta* and Omega of the parameters ``idx`` (the wrapper's own views), or empty lists: no penalty."""
    if not tracked:
        return [], []
    return ([reg.anchors[positions[params[i]]] for i in idx], [reg.omegas[positions[params[i]]] for i in idx])


def _sum(total, value):
    return value if total is None else total + value.to(total.device)


class _AdamStep(_PenaltyStep):
    def _group_step(self, gi: int, group: dict, reg, positions: dict, lam: float):
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        if self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps):
            raise ValueError(f"mk.optim.{type(self).__name__}: param_groups[{gi}] holds complex parameters, "
                             f"which the fused step does not support; use torch.optim.{type(self).__name__}")
        beta1, beta2 = group["betas"]
        scalars = (_scalar(group["lr"]), _scalar(beta1), _scalar(beta2), _scalar(group["eps"]),
                   _scalar(group["weight_decay"]),
                   bool(group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))),
                   bool(group["maximize"]))
        amsgrad = bool(group["amsgrad"])
        n = len(params)
        total = None
        for (_, tracked, native), idx in self._partition(params, positions).items():
            anchors, omegas = _state_lists(reg, positions, params, idx, tracked)
            run = torch.ops.mas_kernels.adam_penalty_step_ if native else adam_penalty_step_torch
            value = run(_pick(params, idx, n), _pick(grads, idx, n), _pick(exp_avgs, idx, n),
                        _pick(exp_avg_sqs, idx, n), _pick(max_sqs, idx, n) if amsgrad else [],
                        _pick(steps, idx, n), anchors, omegas, lam if tracked else 0.0, *scalars)
            if tracked:
                total = _sum(total, value)
        return total


class Adam(_AdamStep, torch.optim.Adam):
    r"""``torch.optim.Adam`` whose step adds the MAS penalty gradient ``2 lam Omega (theta - theta*)``
    to the gradient in the same pass (module docstring). ``weight_decay`` is coupled (L2, added to the
    gradient) unless ``decoupled_weight_decay=True`` (then it is :class:`AdamW`).

    Args: those of ``torch.optim.Adam``, and ``mas``: the :class:`mas_kernels.MAS` whose Omega,
    theta* and lam the penalty uses.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, mas, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False):
        _refuse("Adam", fused=fused, capturable=capturable, differentiable=differentiable)
        extra = {"decoupled_weight_decay": True} if decoupled_weight_decay else {}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize, **extra)
        self._init_mas(mas)


class AdamW(_AdamStep, torch.optim.AdamW):
    r"""``torch.optim.AdamW`` whose step adds the MAS penalty gradient ``2 lam Omega (theta - theta*)``
    to the gradient in the same pass (module docstring). Weight decay is decoupled: theta is scaled by
    ``1 - lr wd`` (before the update, from the gradient taken at the unscaled theta, as torch does).

    Args: those of ``torch.optim.AdamW``, and ``mas``: the :class:`mas_kernels.MAS` whose Omega,
    theta* and lam the penalty uses.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, mas, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        _refuse("AdamW", fused=fused, capturable=capturable, differentiable=differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach)
        self._init_mas(mas)


class SGD(_PenaltyStep, torch.optim.SGD):
    r"""``torch.optim.SGD`` whose step adds the MAS penalty gradient ``2 lam Omega (theta - theta*)``
    to the gradient in the same pass (module docstring). Weight decay is coupled (``wd * theta`` added
    to the gradient), momentum, dampening and nesterov as torch defines them.

    Args: those of ``torch.optim.SGD``, and ``mas``: the :class:`mas_kernels.MAS` whose Omega,
    theta* and lam the penalty uses.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, mas, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None):
        _refuse("SGD", fused=fused, differentiable=differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach)
        self._init_mas(mas)

    def _group_step(self, gi: int, group: dict, reg, positions: dict, lam: float):
        params, grads, bufs = [], [], []
        if self._init_group(group, params, grads, bufs):
            raise ValueError(f"mk.optim.SGD: param_groups[{gi}] has sparse gradients, which the fused step "
                             "does not support; use torch.optim.SGD")
        momentum = _scalar(group["momentum"])
        scalars = (_scalar(group["lr"]), _scalar(group["weight_decay"]), momentum, _scalar(group["dampening"]),
                   bool(group["nesterov"]), bool(group["maximize"]))
        total = None
        for (_, tracked, native), idx in self._partition(params, positions).items():
            run = torch.ops.mas_kernels.sgd_penalty_step_ if native else sgd_penalty_step_torch
            # torch.optim.SGD starts a momentum buffer as a copy of the first gradient: those
            # parameters get a buffer (written whole by the step) and a call of their own.
            calls = [(idx, False)]
            if momentum != 0:
                first = [i for i in idx if bufs[i] is None]
                for i in first:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = torch.empty_like(params[i])
                calls = [(part, flag) for part, flag in ((first, True), ([i for i in idx if i not in set(first)],
                                                                           False)) if part]
            for part, first_step in calls:
                anchors, omegas = _state_lists(reg, positions, params, part, tracked)
                value = run([params[i] for i in part], [grads[i] for i in part],
                            [bufs[i] for i in part] if momentum != 0 else [], anchors, omegas,
                            lam if tracked else 0.0, *scalars, first_step)
                if tracked:
                    total = _sum(total, value)
        return total
