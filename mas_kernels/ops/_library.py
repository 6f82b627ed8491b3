"""The ``mas_kernels::`` operator namespace: schemas, kernels and fake kernels.

The ops are defined with the low-level ``torch.library.Library`` API rather
than ``torch.library.custom_op``. Why: ``custom_op`` wraps every call in three
Python dispatcher kernels (autograd, a version-counter bump, and a backend
wrapper that checks aliasing), measured on a 2-core CPU at about 50 us per
call plus about 0.5 us per tensor in list arguments (0.37 ms for a
161-tensor ``penalty_grad_``). On a 3 ms training step that is a few percent
by itself. Here an op costs one Python kernel (21 us and 0.1 ms on the same
calls):

* ``CompositeExplicitAutograd``: the Python kernel, for every device without
  a kernel of its own. It runs the Triton or the PyTorch implementation (see
  ``_backend.choose``) under ``no_grad`` and bumps the version counter of each
  mutated tensor, as an in-place PyTorch op does (Triton writes through data
  pointers, which autograd cannot see).
* ``Autograd``: a fallthrough for the non-differentiable ops (the in-place
  accumulations, and ``penalty_grad_``, whose value is not differentiable):
  no graph is recorded, and none of their outputs requires grad. The one
  differentiable op, ``penalty``, registers its formula with
  ``torch.library.register_autograd``.
* A fake (meta) kernel, for ``torch.compile``, ``torch.export`` and ``opcheck``.
* ``CPU``, where the native extension is built: its C++ kernels
  (``csrc/dispatch.cpp``, see :func:`register_native_cpu_kernels`), so a CPU
  call runs no Python at all. In a training step, with a cold cache, the
  Python kernel's own work cost ~0.13 ms per call, as much as the penalty's
  memory pass over a 0.5M-parameter MLP.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.graph import increment_version

NAMESPACE = "mas_kernels"
LIB = torch.library.Library(NAMESPACE, "DEF")
KERNELS: dict[str, Callable] = {}  # op name -> its Python kernel


def define(schema: str, kernel: Callable, fake: Callable, *, mutated: tuple[int, ...] = (),
           differentiable: bool = False) -> str:
    """Define ``mas_kernels::<schema>`` with ``kernel`` for all devices and ``fake`` for tracing.

    ``mutated``: positions of the arguments written in place (a tensor or a
    list of tensors); their version counters are bumped after the kernel.
    Returns the qualified name.
    """
    name = schema.split("(", 1)[0]
    qualname = f"{NAMESPACE}::{name}"
    LIB.define(schema)

    def run(*args):
        with torch.no_grad():
            out = kernel(*args)
        for i in mutated:
            increment_version(args[i])
        return out

    run.__name__ = run.__qualname__ = f"{name}_kernel"
    KERNELS[name] = run
    LIB.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=LIB)
    if not differentiable:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return qualname


def register_native_cpu_kernels() -> bool:
    """Put the C++ kernels of ``mas_kernels._C`` on the ops' CPU dispatch key, when it loaded.

    Then a CPU call runs no Python: the C++ kernel reads ``MAS_KERNELS_BACKEND``
    itself (``auto``/``native``: the C++ kernel; anything else: the Python
    kernel above, which follows ``_backend.choose``). Without the module the
    Python kernels serve CPU tensors too. Returns whether it registered.
    """
    from .. import _native

    mod, _ = _native._load()  # no warning here: that is for the first CPU op under auto
    if mod is None:
        return False
    mod.register_cpu_kernels(KERNELS["abs_outer_accumulate_"], KERNELS["abs_accumulate_"],
                             KERNELS["penalty_grad_"], KERNELS["penalty"])
    return True
