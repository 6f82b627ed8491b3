r"""An optimizer step with the MAS penalty gradient in the same pass over memory.

.. math::

    g_i = \nabla_{\theta_i} L_{\text{task}} + 2 \lambda\, \Omega_i \odot (\theta_i - \theta^*_i)

then one Adam/AdamW or SGD update with ``g_i``, exactly as ``torch.optim``
defines it. So one call equals ``penalty_grad_(...)`` into the gradients
followed by ``torch.optim.AdamW.step()`` (or ``SGD.step()``), without
writing the penalty gradient anywhere: per element, Adam reads theta, grad,
m, v, theta*, Omega and writes theta, m, v (36 bytes in fp32, against 20 +
28 for the two passes); SGD with momentum reads theta, grad, buf, theta*,
Omega and writes theta, buf (28 bytes against 20 + 20). The ``grads`` are
not written.

``adam_penalty_step_`` (``g`` as above; ``maximize`` negates it first):

.. code-block:: text

    step += 1                                   (each tensor's own step count)
    coupled (Adam):     g <- g + wd theta
    decoupled (AdamW):  theta <- theta (1 - lr wd)
    m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
    amsgrad: vmax <- max(vmax, v), v-hat from vmax
    theta <- theta - lr / (1 - beta1^step) * m / (sqrt(v-hat) / sqrt(1 - beta2^step) + eps)

``sgd_penalty_step_``: ``g <- g + wd theta`` (coupled, the only kind
``torch.optim.SGD`` has); with momentum, ``buf <- g`` on the first step,
else ``buf <- momentum buf + (1 - dampening) g``, then ``g <- g + momentum
buf`` (nesterov) or ``g <- buf``; ``theta <- theta - lr g``.

Both return the penalty ``lam * sum_i sum Omega_i (theta_i - theta*_i)^2``
at the parameters the step started from (a 0-dim float32 tensor on the
parameters' device, no host synchronization). Empty ``anchors`` and
``omegas`` mean no penalty: the plain optimizer step (and a value of 0).

Arithmetic is float32 per element whatever the storage (float32, bfloat16,
float16); each written tensor is rounded once, when stored. The optimizer
state has the dtype ``torch.optim`` gives it (the parameter's). The scalars
are runtime arguments everywhere: a new ``lr``, ``lam`` or step count never
recompiles a kernel.

The callers are :mod:`mas_kernels.optim`'s optimizers, which own the state
they pass; the ops' guard checks what keeps a direct call from writing
something wrong (scalars, writable outputs, list lengths, an output passed
twice), the native kernels the same, and overlapping views in C++ as well.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ._checks import check_outputs, check_scalar
from ._library import define
from ._steps import by_step

ADAM = "adam_penalty_step_"
SGD = "sgd_penalty_step_"


# ------------------------------------------------------------------ checks
def _check_lengths(op: str, n: int, **lists) -> None:
    for name, xs in lists.items():
        if len(xs) != n:
            raise ValueError(f"{op}: {name} has {len(xs)} tensors but params has {n}")


def _check_penalty_lists(op: str, n: int, anchors, omegas) -> None:
    if len(anchors) != len(omegas) or len(anchors) not in (0, n):
        raise ValueError(f"{op}: anchors and omegas must both be empty (no penalty) or both have one tensor per "
                         f"parameter; got {len(anchors)} and {len(omegas)} for {n} params")


def _check_distinct(op: str, **outputs) -> None:
    """No tensor written twice: an output list holding a tensor twice, or one tensor in two output lists.

    Data pointers only (a set over the lists: cheap); partial overlaps of distinct views are
    refused by the native kernels, and never produced by :mod:`mas_kernels.optim`.
    """
    seen: dict[int, str] = {}
    for name, xs in outputs.items():
        for i, t in enumerate(xs):
            if t.numel() == 0:
                continue
            ptr = t.data_ptr()
            other = seen.setdefault(ptr, f"{name}[{i}]")
            if other != f"{name}[{i}]":
                raise ValueError(f"{op}: {name}[{i}] and {other} are the same memory, which the step writes; "
                                 "pass a separate tensor for each")


def adam_guard(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, omegas, lam, lr,
               beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize) -> None:
    """What every kernel of ``adam_penalty_step_`` checks (the registered ones too): cheap, before any write."""
    n = len(params)
    _check_lengths(ADAM, n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
    if len(max_exp_avg_sqs) not in (0, n):
        raise ValueError(f"{ADAM}: max_exp_avg_sqs has {len(max_exp_avg_sqs)} tensors; pass none (no amsgrad) "
                         f"or one per parameter ({n})")
    _check_penalty_lists(ADAM, n, anchors, omegas)
    check_scalar(ADAM, "lam", lam, scale=2.0)
    for name, x in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        check_scalar(ADAM, name, x)
    for name, xs in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("max_exp_avg_sqs", max_exp_avg_sqs)):
        check_outputs(ADAM, name, xs)
    if not torch.compiler.is_compiling():
        _check_distinct(ADAM, params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                        max_exp_avg_sqs=max_exp_avg_sqs, state_steps=state_steps)


def sgd_guard(params, grads, momentum_buffers, anchors, omegas, lam, lr, weight_decay, momentum, dampening,
              nesterov, maximize, first_step) -> None:
    """What every kernel of ``sgd_penalty_step_`` checks (the registered ones too): cheap, before any write."""
    n = len(params)
    _check_lengths(SGD, n, grads=grads)
    if len(momentum_buffers) not in (0, n) or (n and (momentum != 0) != bool(momentum_buffers)):
        raise ValueError(f"{SGD}: momentum_buffers has {len(momentum_buffers)} tensors with momentum={momentum}; "
                         f"pass one per parameter ({n}) when momentum != 0, none when it is 0")
    _check_penalty_lists(SGD, n, anchors, omegas)
    check_scalar(SGD, "lam", lam, scale=2.0)
    for name, x in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening)):
        check_scalar(SGD, name, x)
    for name, xs in (("params", params), ("momentum_buffers", momentum_buffers)):
        check_outputs(SGD, name, xs)
    if not torch.compiler.is_compiling():
        _check_distinct(SGD, params=params, momentum_buffers=momentum_buffers)


# --------------------------------------------------------------- the definition
_WIDE = (torch.float32, torch.float64)


def _opmath(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in the precision of the arithmetic: float16/bfloat16 as float32 copies; float32
    (and float64, which only this path serves) themselves."""
    return [t if t.dtype in _WIDE else t.float() for t in ts]


def _store(outs: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Round the float32 results into the outputs that are stored in another dtype."""
    for o, w in zip(outs, work):
        if w is not o:
            o.copy_(w)


def _penalty_grads(params_op, grads, anchors, omegas, lam: float, device) -> tuple[list, torch.Tensor]:
    """``grad + 2 lam Omega (p - a)`` as new float32 tensors, and ``lam * sum Omega (p - a)^2``."""
    if not anchors:
        return [g.clone() if g.dtype in _WIDE else g.float() for g in grads], \
            torch.zeros((), dtype=torch.float32, device=device)
    d = torch._foreach_sub(params_op, _opmath(anchors))
    od = torch._foreach_mul(_opmath(omegas), d)
    g = torch._foreach_add(_opmath(grads), od, alpha=2.0 * lam)
    # sum Omega d^2 per tensor; od * d >= 0, so its L1 norm is its sum, accumulated in float64 (in float32
    # the multi-tensor norm adds serially: 1e-5 relative off on 3e4 elements, where a pairwise sum is 1e-7).
    value = (torch.stack(torch._foreach_norm(torch._foreach_mul(od, d), 1, dtype=torch.float64)).sum() * lam).float()
    return g, value


def adam_penalty_step_torch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, omegas,
                            lam: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                            decoupled_weight_decay: bool, maximize: bool) -> torch.Tensor:
    """The readable definition, in ``torch._foreach_*`` ops: torch.optim's multi-tensor Adam on ``g``."""
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    amsgrad = bool(max_exp_avg_sqs)
    for step, idx in by_step(state_steps).items():
        pick = (lambda xs: [xs[i] for i in idx]) if len(idx) != len(params) else (lambda xs: list(xs))
        p_out, m_out, v_out = pick(params), pick(exp_avgs), pick(exp_avg_sqs)
        p, m, v = _opmath(p_out), _opmath(m_out), _opmath(v_out)
        g, value = _penalty_grads(p, pick(grads), pick(anchors) if anchors else [],
                                  pick(omegas) if omegas else [], lam, device)
        total = total + value
        if maximize:
            torch._foreach_neg_(g)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(p, 1.0 - lr * weight_decay)
            else:
                torch._foreach_add_(g, p, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** step)
        bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
        if amsgrad:
            vmax_out = pick(max_exp_avg_sqs)
            vmax = _opmath(vmax_out)
            torch._foreach_maximum_(vmax, v)
            _store(vmax_out, vmax)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, -step_size)
        _store(p_out, p)
        _store(m_out, m)
        _store(v_out, v)
    return total


def sgd_penalty_step_torch(params, grads, momentum_buffers, anchors, omegas, lam: float, lr: float,
                           weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                           first_step: bool) -> torch.Tensor:
    """The readable definition, in ``torch._foreach_*`` ops: torch.optim's multi-tensor SGD on ``g``."""
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    p = _opmath(params)
    g, value = _penalty_grads(p, grads, anchors, omegas, lam, device)
    if maximize:
        torch._foreach_neg_(g)
    if weight_decay != 0:
        torch._foreach_add_(g, p, alpha=weight_decay)
    if momentum != 0:
        buf = _opmath(momentum_buffers)
        if first_step:
            for b, x in zip(buf, g):
                b.copy_(x)
        else:
            torch._foreach_mul_(buf, momentum)
            torch._foreach_add_(buf, g, alpha=1.0 - dampening)
        _store(momentum_buffers, buf)
        if nesterov:
            torch._foreach_add_(g, buf, alpha=momentum)
        else:
            g = buf
    torch._foreach_add_(p, g, alpha=-lr)
    _store(params, p)
    return value


# ---------------------------------------------------------- Triton or torch
@functools.lru_cache(maxsize=None)
def _warn_triton_omega(dtype: torch.dtype) -> None:
    warnings.warn(f"mas_kernels: the Triton optimizer-step kernels read float32 Omega; {dtype} Omega runs on the "
                  "PyTorch path (same values, slower)", RuntimeWarning, stacklevel=3)


def _triton_reads(omegas) -> bool:
    for o in omegas:
        if o.dtype is not torch.float32:
            _warn_triton_omega(o.dtype)
            return False
    return True


def _float64(*lists) -> bool:
    return any(t.dtype is torch.float64 for ts in lists for t in ts)


def adam_penalty_step_triton_or_torch(*args):
    """The Triton kernel for float32 Omega (what it reads); the PyTorch path for 16-bit Omega, and for float64
    tensors (as every op: see ``ops/triton/__init__.py``)."""
    if _float64(*args[:4], args[6], args[7]) or not _triton_reads(args[7]):
        return adam_penalty_step_torch(*args)
    from .triton.optim_step import adam_penalty_step_triton
    return adam_penalty_step_triton(*args)


def sgd_penalty_step_triton_or_torch(*args):
    """The Triton kernel for float32 Omega (what it reads); the PyTorch path for 16-bit Omega, and for float64
    tensors."""
    if _float64(*args[:5]) or not _triton_reads(args[4]):
        return sgd_penalty_step_torch(*args)
    from .triton.optim_step import sgd_penalty_step_triton
    return sgd_penalty_step_triton(*args)


def _fake(params, *args):
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


define("adam_penalty_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
       "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor[] anchors, Tensor[] omegas, float lam, "
       "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
       "bool maximize) -> Tensor",
       _fake,
       {"torch": f"{__name__}:adam_penalty_step_torch", "triton": f"{__name__}:adam_penalty_step_triton_or_torch"},
       mutated=(0, 2, 3, 4, 5), guard=adam_guard)

define("sgd_penalty_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] anchors, "
       "Tensor[] omegas, float lam, float lr, float weight_decay, float momentum, float dampening, bool nesterov, "
       "bool maximize, bool first_step) -> Tensor",
       _fake,
       {"torch": f"{__name__}:sgd_penalty_step_torch", "triton": f"{__name__}:sgd_penalty_step_triton_or_torch"},
       mutated=(0, 2), guard=sgd_guard)
