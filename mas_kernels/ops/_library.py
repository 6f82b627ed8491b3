"""The ``mas_kernels::`` operator namespace: each op defined once, one kernel per dispatch key.

An op is declared here with its schema, its fake (meta) kernel and its
implementations by backend name (``"torch"``, ``"triton"``). What runs for a
device is the kernel registered on that device's dispatch key, so the
dispatcher picks, and nothing chooses per call (bitsandbytes' shape):

* ``CompositeExplicitAutograd``: the PyTorch implementation, the readable
  definition; it serves every device without a kernel of its own (and CPU
  or CUDA when ``torch`` is the chosen backend).
* ``CPU`` and ``CUDA``: the chosen backend's kernel, put there by
  :func:`mas_kernels._backend.use` (the native C++ kernels on ``CPU``
  register themselves from ``csrc/dispatch.cpp``).
* ``Autograd``: a fallthrough for the non-differentiable ops (the in-place
  accumulations, and ``penalty_grad_``, whose value is not differentiable):
  no graph is recorded and none of their outputs requires grad. The one
  differentiable op, ``penalty``, registers its formula with
  ``torch.library.register_autograd``.
* A fake kernel, for ``torch.compile``, ``torch.export`` and ``opcheck``.

Every op is defined with its *guard* (``define`` requires one): the checks
that keep a call from writing anything wrong or reading out of bounds,
whoever makes it (``mk.*``, ``mk.MAS``, or ``torch.ops.mas_kernels.*``
directly): list lengths, dtypes, shapes and devices; scalars finite in
float32 (and ``alpha >= 0``); ``memory_budget``; outputs writable element by
element (no inference tensor outside inference mode, no two elements at one
address); no output sharing memory with an input or another output (but for
the same tensor listed twice, and, for elementwise ops, an output that is its
own entry's input). Each raises ``ValueError`` naming the op, the argument and
the index, before the first write. The Python kernels (torch, Triton) run the
guard first; the native C++ kernels carry the same checks in C++
(``csrc/guard.cpp``): a Python guard in front of them would cost the Python
trip their registration on the ``CPU`` key exists to avoid.
``tests/test_ops_guard.py`` makes every refused call on every backend.

The ops' Python front doors run the same guard (with ``None`` grads allowed
for ``penalty_grad_``) and then call the op through :func:`prevalidated`, so
the Python kernel does not check twice; ``Regularizer`` does the same for its
fixed lists once it has validated them. Then the kernel runs its
implementation under ``no_grad`` and bumps the version counter of each tensor
it wrote, as an in-place PyTorch op does (Triton writes through data
pointers, which autograd cannot see).

Why the low-level ``torch.library.Library`` API and not ``custom_op``:
``custom_op`` wraps every call in three Python dispatcher kernels (autograd, a
version-counter bump, and a backend wrapper that checks aliasing), measured on
a 2-core CPU at about 50 us per call plus about 0.5 us per tensor in list
arguments (0.37 ms for a 161-tensor ``penalty_grad_``). Here a Python-served
op costs one Python kernel (21 us and 0.1 ms on the same calls) and a
native-served CPU op none.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Callable

import torch
from torch.autograd.graph import increment_version

NAMESPACE = "mas_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


class _Trust(threading.local):
    skip = False  # the next Python kernel this thread runs skips its guard (see prevalidated)


_TRUST = _Trust()


def prevalidated(op: Callable, *args):
    """``op(*args)``, whose arguments the caller has just passed through the op's guard: the Python
    kernel that serves the call skips it (the native kernels check in C++ regardless, cheaply).

    For the ops' front doors and ``Regularizer``, never for arguments that were
    not guarded: the guard is what keeps a kernel from writing out of bounds.
    Under ``torch.compile`` the traced call is a plain one (the flag would not
    reach the compiled graph's kernel call).
    """
    if torch.compiler.is_compiling():
        return op(*args)
    _TRUST.skip = True
    try:
        return op(*args)
    finally:
        _TRUST.skip = False


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: where its implementations live, which arguments it writes, and its guard."""

    name: str
    impls: dict[str, str]   # backend -> "module:function" (imported on first call)
    mutated: tuple[int, ...]
    guard: Callable         # raises ValueError before anything is written

    def load(self, backend: str) -> Callable:
        module, _, fn = self.impls[backend].partition(":")
        return getattr(importlib.import_module(module), fn)

    def kernel(self, backend: str, before: Callable[[], None] | None = None) -> Callable:
        """The Python kernel for ``backend``: the guard, then the implementation under ``no_grad``, then
        the version bumps.

        The implementation is imported on the first call (Triton's modules
        import triton, which must wait: see ``_backend``); ``before`` runs
        once, just before that import.
        """
        impl: list[Callable] = []
        mutated = self.mutated
        guard = self.guard
        trust = _TRUST

        def run(*args):
            if trust.skip:
                trust.skip = False  # one call only: nothing the implementation calls inherits it
            else:
                guard(*args)
            if not impl:
                if before is not None:
                    before()
                impl.append(self.load(backend))
            with torch.no_grad():
                out = impl[0](*args)
            for i in mutated:
                increment_version(args[i])
            return out

        run.__name__ = run.__qualname__ = f"{self.name}_{backend}_kernel"
        return run


OPS: dict[str, Op] = {}


def define(schema: str, fake: Callable, impls: dict[str, str], *, guard: Callable, mutated: tuple[int, ...] = (),
           differentiable: bool = False) -> str:
    """Define ``mas_kernels::<schema>``; returns the qualified name.

    ``impls`` maps backend names to ``"module:function"``; ``"torch"`` is
    required and becomes the ``CompositeExplicitAutograd`` kernel.
    ``guard``: the op's checks (with the op's arguments; raises ``ValueError``
    before anything is written), run in front of every Python kernel of the op
    (see the module docstring); required. ``mutated``: positions of the
    arguments written in place (a tensor or a list of tensors).
    """
    if not callable(guard):
        raise TypeError(f"define({schema.split('(', 1)[0]}): guard must be a callable (every op has one)")
    if "torch" not in impls:
        raise TypeError(f"define({schema.split('(', 1)[0]}): impls must have a 'torch' implementation")
    name = schema.split("(", 1)[0]
    qualname = f"{NAMESPACE}::{name}"
    op = Op(name, dict(impls), tuple(mutated), guard)
    LIB.define(schema)
    LIB.impl(name, op.kernel("torch"), "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=LIB)
    if not differentiable:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    OPS[name] = op
    return qualname
