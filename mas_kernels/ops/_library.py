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

Every Python kernel first runs the op's *guard*: the few checks that keep a
direct ``torch.ops.mas_kernels.*`` call from writing anything wrong, the same
as the native kernels make in C++ (scalars finite in float32, outputs
writable element by element, no output sharing memory with an input it is
tiled against). The full, worded validation is the ops' Python front doors';
the guard only makes every backend refuse the same calls, before the first
write, at a cost of an attribute read or two per tensor. Then the kernel runs
its implementation under ``no_grad`` and bumps the version counter of each
tensor it wrote, as an in-place PyTorch op does (Triton writes through data
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
from typing import Callable

import torch
from torch.autograd.graph import increment_version

NAMESPACE = "mas_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: where its implementations live and which arguments it writes."""

    name: str
    impls: dict[str, str]   # backend -> "module:function" (imported on first call)
    mutated: tuple[int, ...]
    guard: Callable | None = None  # raises ValueError before anything is written

    def load(self, backend: str) -> Callable:
        module, _, fn = self.impls[backend].partition(":")
        return getattr(importlib.import_module(module), fn)

    def kernel(self, backend: str, before: Callable[[], None] | None = None) -> Callable:
        """The Python kernel for ``backend``: the implementation under ``no_grad``, then the version bumps.

        The implementation is imported on the first call (Triton's modules
        import triton, which must wait: see ``_backend``); ``before`` runs
        once, just before that import.
        """
        impl: list[Callable] = []
        mutated = self.mutated
        guard = self.guard

        def run(*args):
            if guard is not None:
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


def define(schema: str, fake: Callable, impls: dict[str, str], *, mutated: tuple[int, ...] = (),
           differentiable: bool = False, guard: Callable | None = None) -> str:
    """Define ``mas_kernels::<schema>``; returns the qualified name.

    ``impls`` maps backend names to ``"module:function"``; ``"torch"`` is
    required and becomes the ``CompositeExplicitAutograd`` kernel.
    ``mutated``: positions of the arguments written in place (a tensor or a
    list of tensors). ``guard``: checks every Python kernel of the op runs first
    (see the module docstring).
    """
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
