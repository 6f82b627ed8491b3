r"""The MAS penalty and its gradient, fused over all parameters.

.. math::

    L = \lambda \sum_i \sum \Omega_i \odot (\theta_i - \theta^*_i)^2,
    \qquad \frac{\partial L}{\partial \theta_i} = 2 \lambda\, \Omega_i \odot (\theta_i - \theta^*_i)

``penalty_grad_`` returns ``L`` and adds the gradient into given buffers in the
same pass over memory (per element: read theta, theta*, Omega, grad; write
grad). ``penalty`` is the same value as a differentiable function of the
parameters, which also has a second derivative (the Hessian of ``L`` is
``2 lambda Omega``, diagonal). (FACIL's MAS halves this penalty; Avalanche and
the paper's code do not.)

Omega may be float32, bfloat16 or float16 (products are taken in float32), or
float64. Where one of an entry's four tensors (theta, theta*, Omega, grad) is
float64 the entry is computed in float64, and the value is float64 when any
tensor of the call is (float64 models, exactness tests); else everything is
float32 arithmetic and the value is float32.
"""

from __future__ import annotations

import torch

import functools
import warnings

from ._checks import (FLOAT_DTYPES, check_like, check_list, check_no_overlap, check_not_requiring_grad,
                      check_outputs, check_same_device, check_scalar, check_tensor, compute_dtype, native_checks)
from ._library import LIB, define, prevalidated

OP = "penalty_grad_"


def _all_valid(params, anchors, omegas, grads) -> bool:
    """One cheap pass for the common case."""
    if not params:
        return True
    fl, Tensor = FLOAT_DTYPES, torch.Tensor
    device = params[0].device if isinstance(params[0], Tensor) else None
    for p, a, o, g in zip(params, anchors, omegas, grads if grads is not None else params):
        if not (isinstance(p, Tensor) and isinstance(a, Tensor) and isinstance(o, Tensor) and isinstance(g, Tensor)):
            return False
        shape = p.shape
        if (p.dtype not in fl or a.dtype not in fl or g.dtype not in fl or o.dtype not in fl
                or a.shape != shape or o.shape != shape or g.shape != shape
                or p.device != device or a.device != device or o.device != device or g.device != device):
            return False
    return True


def _check(op, params, anchors, omegas, lam, grads=None, grads_arg="grads"):
    """The lists (lengths checked), each entry's dtypes, shapes and device, and ``lam``.

    ``grads`` may hold ``None`` entries (the front door's missing ``.grad``:
    fresh zeros later); ``grads_arg`` names them (``"params[{}].grad"``).
    """
    params = check_list(op, "params", params, None)
    anchors = check_list(op, "anchors", anchors, len(params), "params")
    omegas = check_list(op, "omegas", omegas, len(params), "params")
    if grads is not None:
        grads = check_list(op, grads_arg if "{}" not in grads_arg else "grads", grads, len(params), "params")
    if _all_valid(params, anchors, omegas, grads):
        return params, anchors, omegas, check_scalar(op, "lam", lam, scale=2.0), grads
    # Something is off: the per-argument checks below say what, and where.
    for i, p in enumerate(params):
        check_tensor(op, "params", p, i)
        check_tensor(op, "anchors", anchors[i], i)
        check_like(op, "anchors", anchors[i], "params", p, i)
        check_tensor(op, "omegas", omegas[i], i)
        check_like(op, "omegas", omegas[i], "params", p, i)
        if grads is not None and (grads[i] is not None or "{}" not in grads_arg):
            check_tensor(op, grads_arg, grads[i], i)
            check_like(op, grads_arg, grads[i], "params", p, i)
    if params:
        check_same_device(op, "params", params, params[0].device)
    return params, anchors, omegas, check_scalar(op, "lam", lam, scale=2.0), grads


def _check_written(op, params, anchors, omegas, grads, grads_arg="grads") -> None:
    """The grads can be updated in place: not requiring grad (with grad mode on), writable element by
    element, sharing no memory with an input or another grad (but for the same tensor twice, or a
    grad that is its own entry's param, anchor or omega)."""
    check_not_requiring_grad(op, grads_arg, grads)
    check_outputs(op, grads_arg, grads)
    check_no_overlap(op, grads_arg, grads, [("params", params), ("anchors", anchors), ("omegas", omegas)],
                     elementwise=True)


def guard(params, anchors, omegas, lam, grads) -> None:
    """Everything ``penalty_grad_`` checks, in front of every kernel (see ``_library``), before any write
    (in C++ where the native extension is built: the same checks, see ``_checks``)."""
    native = native_checks()
    if native is not None:
        native.guard_penalty(OP, params, anchors, omegas, lam, grads)
        return
    params, anchors, omegas, lam, grads = _check(OP, params, anchors, omegas, lam, grads)
    _check_written(OP, params, anchors, omegas, grads)


def penalty_guard(params, anchors, omegas, lam) -> None:
    """Everything ``penalty`` checks (it writes nothing the caller passed)."""
    native = native_checks()
    if native is not None:
        native.guard_penalty("penalty", params, anchors, omegas, lam, None)
        return
    _check("penalty", params, anchors, omegas, lam)


def value_dtype(*lists) -> torch.dtype:
    """The dtype of the penalty's value: float64 when any tensor of the call is float64, else float32."""
    for ts in lists:
        for t in ts:
            if t.dtype is torch.float64:
                return torch.float64
    return torch.float32


def penalty_grad_torch(params, anchors, omegas, lam: float, grads) -> torch.Tensor:
    """The readable definition: per tensor, d = p - anchor in fp32 (fp64 when one of the four tensors is
    fp64); sum Omega d^2; grad += 2 lam Omega d."""
    device = params[0].device if params else torch.device("cpu")
    f64 = value_dtype(params, anchors, omegas, grads) is torch.float64
    total = torch.zeros((), dtype=torch.float64 if f64 else torch.float32, device=device)
    for p, a, o, g in zip(params, anchors, omegas, grads):
        if f64 and compute_dtype(p, a, o, g) is torch.float64:
            d = p.double() - a.double()
        else:
            d = p.float() - a.float()
        od = o * d  # promotes 16-bit Omega to d's dtype
        total += (od * d).sum()
        g.add_(od, alpha=2.0 * lam)
    return total * lam


@functools.lru_cache(maxsize=None)
def _warn_triton_omega(dtype: torch.dtype) -> None:
    warnings.warn(f"mas_kernels: the Triton penalty kernel reads float32 Omega; {dtype} Omega runs on the "
                  "PyTorch path (same values, slower)", RuntimeWarning, stacklevel=3)


def penalty_grad_triton_or_torch(params, anchors, omegas, lam: float, grads) -> torch.Tensor:
    """The Triton kernel for float32 Omega (what it reads); the PyTorch path for 16-bit Omega, and for a
    call with a float64 tensor (float64 is for exactness, not speed: see ``ops/triton/__init__.py``)."""
    from .triton.multi_tensor import penalty_grad_triton

    f32 = torch.float32
    for o in omegas:
        if o.dtype is not f32:
            if o.dtype is not torch.float64:
                _warn_triton_omega(o.dtype)
            return penalty_grad_torch(params, anchors, omegas, lam, grads)
    if value_dtype(params, anchors, grads) is torch.float64:
        return penalty_grad_torch(params, anchors, omegas, lam, grads)
    return penalty_grad_triton(params, anchors, omegas, lam, grads)


def _penalty_grad_fake(params, anchors, omegas, lam, grads):
    return params[0].new_empty((), dtype=value_dtype(params, anchors, omegas, grads))


def with_grads(penalty_grad_impl):
    """The ``penalty`` op from a ``penalty_grad_`` implementation: the gradient into fresh zeros."""
    def penalty_impl(params, anchors, omegas, lam):
        grads = [torch.zeros_like(p) for p in params]
        return penalty_grad_impl(params, anchors, omegas, lam, grads), grads

    return penalty_impl


penalty_torch = with_grads(penalty_grad_torch)
penalty_triton_or_torch = with_grads(penalty_grad_triton_or_torch)

define("penalty_grad_(Tensor[] params, Tensor[] anchors, Tensor[] omegas, float lam, Tensor(a!)[] grads) -> Tensor",
       _penalty_grad_fake,
       {"torch": f"{__name__}:penalty_grad_torch", "triton": f"{__name__}:penalty_grad_triton_or_torch"},
       guard=guard, mutated=(4,))


def _penalty_fake(params, anchors, omegas, lam):
    return (params[0].new_empty((), dtype=value_dtype(params, anchors, omegas)),
            [torch.empty_like(p) for p in params])


def _penalty_setup_context(ctx, inputs, output):
    params, anchors, omegas, lam = inputs
    grads = output[1]
    ctx.n = len(params)
    ctx.lam = lam
    # The inputs too, for a second derivative (create_graph=True): saving references costs no copy.
    ctx.save_for_backward(*grads, *params, *anchors, *omegas)
    ctx.mark_non_differentiable(*grads)  # the gradient output is data, not a function to differentiate


def _penalty_backward(ctx, grad_value, grad_grads):
    saved = ctx.saved_tensors
    n = ctx.n
    none = [None] * n
    if not torch.is_grad_enabled():
        # First order (the common case): the gradient came out of the forward's fused pass;
        # scale it by the incoming grad in one multi-tensor call.
        return list(torch._foreach_mul(list(saved[:n]), grad_value)), none, list(none), None
    # create_graph=True: the gradient as a differentiable function of the parameters, so that a
    # second backward gives the Hessian-vector product 2 lam Omega v (times grad_value).
    params, anchors, omegas = saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
    two_lam = 2.0 * ctx.lam
    grads = []
    for p, a, o in zip(params, anchors, omegas):
        ct = compute_dtype(p, a, o)
        grads.append(((grad_value * two_lam).to(ct) * o.to(ct) * (p.to(ct) - a.to(ct))).to(p.dtype))
    return grads, none, list(none), None


_PENALTY = define("penalty(Tensor[] params, Tensor[] anchors, Tensor[] omegas, float lam) -> (Tensor, Tensor[])",
                  _penalty_fake,
                  {"torch": f"{__name__}:penalty_torch", "triton": f"{__name__}:penalty_triton_or_torch"},
                  guard=penalty_guard, differentiable=True)
torch.library.register_autograd(_PENALTY, _penalty_backward, setup_context=_penalty_setup_context, lib=LIB)


def penalty_grad_(params, anchors, omegas, lam: float, grads=None) -> torch.Tensor:
    r"""Return ``lam * sum_i sum omega_i * (p_i - anchor_i)^2`` and add its gradient.

    ``2 * lam * omega_i * (p_i - anchor_i)`` is added into ``grads[i]`` in the
    same pass. With ``grads=None`` it is added into each ``params[i].grad``,
    allocated as zeros where it is ``None``.

    Args:
        params: list of float32/float16/bfloat16/float64 tensors on one device.
        anchors: theta*, one per param, same shape and device (any of those dtypes).
        omegas: importance, one per param, same shape and device (any of those dtypes;
            16-bit Omega is read into float32 element by element).
        lam: the penalty strength lambda (a runtime scalar: new values do not recompile).
        grads: optional list of gradient buffers (same shapes), updated in place.

    Returns:
        A 0-dim tensor on the params' device (0 for empty lists): float64 when a
        tensor of the call is float64 (such entries are computed in float64), else float32.

    The value is not differentiable (see :func:`penalty` for that). Raises
    ``ValueError`` naming the argument and index at fault, the same on every
    backend and through ``torch.ops.mas_kernels.penalty_grad_``, before anything
    is written: also when a gradient buffer requires grad with grad mode on, has
    elements sharing memory (an expanded or overlapping view), shares memory
    with another gradient buffer or with an input, or is an inference tensor
    outside ``torch.inference_mode()``, and when ``2 * lam`` is not finite in
    float32. A parameter listed twice gets both contributions (one ``.grad`` is
    allocated for it when it has none); a gradient buffer listed twice gets both
    updates, in order.
    """
    into_dot_grad = grads is None
    grads_arg = "params[{}].grad" if into_dot_grad else "grads"
    if into_dot_grad:
        params = check_list(OP, "params", params, None)
        grads = [p.grad if isinstance(p, torch.Tensor) else None for p in params]
    params, anchors, omegas, lam, grads = _check(OP, params, anchors, omegas, lam, grads, grads_arg)
    _check_written(OP, params, anchors, omegas, grads, grads_arg)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    fill_missing_grads(params, grads, into_dot_grad)
    # Not differentiable (the op's Autograd key is a fallthrough): no detach needed.
    return prevalidated(torch.ops.mas_kernels.penalty_grad_, params, anchors, omegas, lam, grads)


def fill_missing_grads(params, grads: list, into_dot_grad: bool = True) -> None:
    """Zeros where ``grads[i]`` is None (set as ``params[i].grad`` when ``into_dot_grad``).

    A parameter listed twice gets one buffer, found again through ``.grad``,
    so both of its entries add into it (a tied weight listed per module).
    """
    for i, p in enumerate(params):
        if grads[i] is None:
            g = p.grad if into_dot_grad else None
            if g is None:
                g = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if into_dot_grad:
                    p.grad = g
            grads[i] = g


def penalty(params, anchors, omegas, lam: float) -> torch.Tensor:
    r"""``lam * sum_i sum omega_i * (p_i - anchor_i)^2``, differentiable w.r.t. ``params``.

    The gradient ``2 * lam * omega_i * (p_i - anchor_i)`` is computed by the same
    fused pass as the value; backward only scales it. Under
    ``create_graph=True`` the backward is itself differentiable: a second
    backward gives the Hessian-vector product ``2 * lam * omega_i * v_i``
    (``torch.func`` transforms do not apply: the op is not a functorch op).
    Same arguments and checks as :func:`penalty_grad_`.
    """
    params, anchors, omegas, lam, _ = _check("penalty", params, anchors, omegas, lam)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    return prevalidated(torch.ops.mas_kernels.penalty, params, [a.detach() for a in anchors], omegas, lam)[0]
