"""Which implementation of an op runs: chosen per call from the tensors' device.

``MAS_KERNELS_BACKEND`` overrides the choice (read on every call, so tests and
benchmarks can switch it):

=========  ==================================================================
``auto``   (default) CUDA -> Triton; CPU -> native C++ kernels if built, else
           the PyTorch path.
``torch``  the PyTorch path everywhere (the readable definition).
``triton`` Triton everywhere; on CPU tensors the kernels run under the Triton
           interpreter (``TRITON_INTERPRET=1``), which is how the test suite
           checks the real kernels on a machine without a GPU.
``native`` the C++ kernels on CPU tensors (error if they are not built);
           Triton on CUDA.
=========  ==================================================================

With the native extension built, the CPU kernels of the ops are its C++
kernels (registered on the dispatcher, see ``ops/_library.py``), which apply
the same rule to this variable in C++ and hand any other choice to the Python
kernels, which ask :func:`choose`.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported (which
``torch._dynamo`` and ``torch.compile`` may do). So the interpreter must
be chosen early: importing ``mas_kernels`` with ``MAS_KERNELS_BACKEND=triton``
on a machine without CUDA sets ``TRITON_INTERPRET=1`` if triton is not yet
imported; the test suite sets it in its conftest. The kernel modules
themselves are imported lazily, on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings

import torch

ENV_VAR = "MAS_KERNELS_BACKEND"
CHOICES = ("auto", "torch", "triton", "native")


def requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    # find_spec, not import: importing triton fixes its interpreter mode.
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _prepare_triton(device: torch.device) -> None:
    """Turn the interpreter on for CPU tensors, which only works before triton is imported."""
    if device.type == "cuda" or interpreting():
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            f"mas_kernels: Triton kernels on {device.type} tensors need its interpreter, but triton "
            "was imported without it; set TRITON_INTERPRET=1 before importing triton or mas_kernels"
        )
    os.environ["TRITON_INTERPRET"] = "1"


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn(
        "mas_kernels: Triton is not installed; CUDA tensors use the PyTorch path "
        "(pip install triton for the fused kernels)",
        RuntimeWarning,
        stacklevel=3,
    )


def native_available() -> bool:
    from . import _native

    return _native.available()


def choose(device: torch.device) -> str:
    """Return ``"torch"``, ``"triton"`` or ``"native"`` for tensors on ``device``."""
    req = requested()
    if req == "torch" or device.type == "meta":
        return "torch"
    if device.type == "cuda":
        if has_triton():
            _prepare_triton(device)
            return "triton"
        if req == "triton":
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (pip install triton)")
        _warn_no_triton()
        return "torch"
    if req == "triton":
        if not has_triton():
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (pip install triton)")
        if device.type != "cpu":
            raise RuntimeError(f"{ENV_VAR}=triton: Triton cannot run on {device.type} tensors")
        _prepare_triton(device)
        return "triton"
    if device.type == "cpu":
        if native_available():
            return "native"
        if req == "native":
            from . import _native

            raise RuntimeError(f"{ENV_VAR}=native but the C++ kernels are not available: {_native.load_error()}")
    return "torch"


def autotune_configs(configs: list) -> list:
    """All configs on a GPU; the first only under the interpreter (it cannot benchmark)."""
    return configs[:1] if interpreting() else configs


def _interpret_if_forced_without_gpu() -> None:
    # Runs at import: torch may import triton at any later point (through
    # torch._dynamo), after which its interpreter mode can no longer change.
    try:
        forced = requested() == "triton"
    except ValueError:
        return  # reported on the first op call
    if forced and "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_if_forced_without_gpu()
