"""Which implementation of the ops runs on each device: one kernel per dispatch key.

The choice is made once, at ``import mas_kernels``, from ``MAS_KERNELS_BACKEND``,
and put on the dispatcher: each op gets the chosen kernel on its ``CPU`` and
``CUDA`` keys, so a call goes straight to it (nothing is decided per call).
:func:`use` changes the choice later (tests and benchmarks do).

=========  ==================================================================
``auto``   (default) CUDA -> Triton (the PyTorch path, with one warning, when
           Triton is not installed); CPU -> native C++ kernels if built, else
           the PyTorch path (with one warning saying why).
``torch``  the PyTorch path everywhere (the readable definition).
``triton`` Triton everywhere; on CPU tensors the kernels run under the Triton
           interpreter (``TRITON_INTERPRET=1``), which is how the test suite
           checks the real kernels on a machine without a GPU.
``native`` the C++ kernels on CPU tensors (an error if they are not built);
           Triton on CUDA.
=========  ==================================================================

Other devices (and every device when nothing more specific is registered)
get the PyTorch path through the ops' ``CompositeExplicitAutograd`` kernel.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported (which
``torch._dynamo`` and ``torch.compile`` may do). So the interpreter must be
chosen early: importing ``mas_kernels`` with ``MAS_KERNELS_BACKEND=triton`` on
a machine without CUDA sets ``TRITON_INTERPRET=1`` if triton is not yet
imported; the test suite sets it in its conftest. The kernel modules
themselves are imported on their first call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import Callable, Iterator

import torch

from . import _native
from .ops._library import NAMESPACE, OPS

ENV_VAR = "MAS_KERNELS_BACKEND"
CHOICES = ("auto", "torch", "triton", "native")
KEYS = ("CPU", "CUDA")

_choice: str | None = None          # what use() was last given
_choice_from = "default"            # where it came from, for info()
_selected: dict[str, str] = {}      # dispatch key -> backend running there
_libs: dict[str, torch.library.Library] = {}  # dispatch key -> the Python kernels registered on it


def _check_choice(value: str, source: str) -> str:
    value = (value or "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{source}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def requested() -> str:
    """The choice ``MAS_KERNELS_BACKEND`` asks for (``auto`` when unset)."""
    return _check_choice(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    # find_spec, not import: importing triton fixes its interpreter mode.
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpret_on_cpu() -> None:
    """Turn the interpreter on for CPU tensors, which only works before triton is imported."""
    if interpreting():
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "mas_kernels: Triton kernels on CPU tensors need its interpreter, but triton was imported "
            "without it; set TRITON_INTERPRET=1 before importing triton or mas_kernels"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def native_available() -> bool:
    return _native.available()


def plan(choice: str) -> dict[str, str]:
    """The backend each dispatch key gets for ``choice``; raises, changing nothing, if it cannot run."""
    choice = _check_choice(choice, "backend")
    if choice == "torch":
        return {"CPU": "torch", "CUDA": "torch"}
    if choice == "triton" and not has_triton():
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (pip install triton)")
    if choice == "triton":
        if "triton" in sys.modules and not interpreting() and not torch.cuda.is_available():
            _interpret_on_cpu()  # raises the worded error: the interpreter can no longer be turned on
        return {"CPU": "triton", "CUDA": "triton"}
    built = _native.built()
    if choice == "native" and not built:
        raise RuntimeError(f"{ENV_VAR}=native but the C++ kernels are not available: {_native.load_error()}")
    return {"CPU": "native" if built else "torch", "CUDA": "triton" if has_triton() else "torch"}


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn(
        "mas_kernels: Triton is not installed; CUDA tensors use the PyTorch path "
        "(pip install triton for the fused kernels)",
        RuntimeWarning,
        stacklevel=4,
    )


def _python_kernels(key: str, backend: str, fallback: bool) -> dict[str, Callable]:
    """The Python kernels for ``key``; ``fallback``: the PyTorch path standing in for a faster
    backend that is missing here, which says so once, on the first call."""
    if backend == "triton":
        before = _interpret_on_cpu if key == "CPU" else None
        return {name: op.kernel("triton", before) for name, op in OPS.items()}
    before = None
    if fallback:
        before = _warn_no_triton if key == "CUDA" else _native.available  # available() warns once, saying why
    return {name: op.kernel("torch", before) for name, op in OPS.items()}


def _register(key: str, backend: str, fallback: bool = False) -> None:
    old = _libs.pop(key, None)
    if old is not None:
        old._destroy()
    if key == "CPU" and _selected.get("CPU") == "native":
        _native.lib().unregister_cpu_kernels()
    _selected.pop(key, None)
    if backend == "native":
        _native.lib().register_cpu_kernels()
    else:
        lib = torch.library.Library(NAMESPACE, "IMPL", key)
        for name, kernel in _python_kernels(key, backend, fallback).items():
            lib.impl(name, kernel)
        _libs[key] = lib
    _selected[key] = backend


def use(choice: str | None = None) -> str:
    """Put the kernels of ``choice`` (default: ``MAS_KERNELS_BACKEND``) on the dispatcher; return the old choice.

    Raises ``ValueError`` for an unknown choice and ``RuntimeError`` when the
    backend cannot run here (Triton not installed, native kernels not built),
    in both cases before anything changes.
    """
    global _choice, _choice_from
    if choice is None:
        source = f"{ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR, "").strip() else "default"
        choice = requested()
    else:
        source, choice = "mk.use_backend", _check_choice(choice, "mas_kernels.use_backend")
    where = plan(choice)
    for key, backend in where.items():
        # Under auto, the PyTorch path on a key stands in for the missing native or Triton kernels.
        _register(key, backend, fallback=choice == "auto" and backend == "torch")
    old, _choice, _choice_from = _choice, choice, source
    return old or "auto"


@contextlib.contextmanager
def using(choice: str) -> Iterator[None]:
    """``use(choice)`` for the block, then the previous choice again."""
    old = use(choice)
    try:
        yield
    finally:
        use(old)


def current() -> str:
    """The choice in effect (``auto``, ``torch``, ``triton`` or ``native``)."""
    return _choice or "auto"


def choose(device: torch.device) -> str:
    """The backend that runs for tensors on ``device``: ``"torch"``, ``"triton"`` or ``"native"``."""
    device = torch.device(device)
    return _selected.get(device.type.upper(), "torch")


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What :func:`info` (``mk.backend_info()``) reports; ``print`` it for a summary.

    Attributes:
        choice: the backend choice in effect (``auto``, ``torch``, ``triton``, ``native``) and ``choice_from``,
            where it came from (``default``, ``MAS_KERNELS_BACKEND=...``, ``mk.use_backend``).
        ops: op name -> device type (``cpu``, ``cuda``, ``other``) -> the kernel serving it (``native``,
            ``triton``, ``torch``).
        reasons: device type -> why that kernel serves it.
        native: the native CPU kernels: ``available``, ``source`` (the loaded file), ``reason`` and ``fix``
            when unavailable, ``openmp``, ``jit_dir`` (the first-import build's cache folder).
        triton: ``installed``, ``version``, ``interpreter`` (Triton kernels run under its CPU interpreter).
        env: the environment variables read (``MAS_KERNELS_BACKEND``, ``MAS_KERNELS_NO_NATIVE``,
            ``TRITON_INTERPRET``, ``TORCH_EXTENSIONS_DIR``), ``None`` when unset.
        package: ``path`` (the mas_kernels imported), ``shadows`` (an installed copy elsewhere that this one
            hides, e.g. a source tree imported from the repository root after ``pip install .``; ``None`` when
            there is none).
    """

    choice: str
    choice_from: str
    ops: dict
    reasons: dict
    native: dict
    triton: dict
    env: dict
    package: dict

    def __str__(self) -> str:
        lines = [f"mas_kernels backend: {self.choice} ({self.choice_from})"]
        for device, why in self.reasons.items():
            served = {ops[device] for ops in self.ops.values()}
            lines.append(f"  {device}: {'/'.join(sorted(served))} - {why}")
        lines.append(f"  package: {self.package['path']}")
        if self.package["shadows"]:
            lines.append(f"  warning: this copy hides the installed one at {self.package['shadows']} (run from "
                         "outside the source tree to use the installed package)")
        return "\n".join(lines)


def _package() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    shadows = None
    with contextlib.suppress(Exception):  # metadata of odd installs must not break info()
        for dist in importlib.metadata.distributions(name="mas_kernels"):
            there = os.path.abspath(str(dist.locate_file("mas_kernels")))
            if there != here and os.path.isfile(os.path.join(there, "__init__.py")):
                shadows = there
    return {"path": here, "shadows": shadows}


def _triton() -> dict:
    version = None
    if has_triton():
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version("triton")
    return {"installed": has_triton(), "version": version, "interpreter": interpreting()}


def _reason(device: str, backend: str, native: dict) -> str:
    chosen = current()
    if device == "other":
        return "the PyTorch path (the ops' CompositeExplicitAutograd kernel) on any other device"
    if backend == "native":
        return f"native C++ kernels from {native['source']}"
    if backend == "triton":
        where = ("under Triton's CPU interpreter (slow: for tests)" if device == "cpu"
                 else "" if torch.cuda.is_available() else "(no CUDA device here)")
        return " ".join(p for p in ("Triton kernels", where) if p)
    if chosen == "torch":
        return "the PyTorch path, as asked"
    if device == "cpu":
        return f"the PyTorch path: native kernels unavailable ({native['reason']}); fix: {native['fix']}"
    return "the PyTorch path: Triton is not installed; fix: pip install triton"


def info() -> BackendInfo:
    """Which kernel serves each op on each device, and why (``mk.backend_info()``).

    Reads the dispatcher's current choice (set at import from ``MAS_KERNELS_BACKEND`` and by
    ``mk.use_backend``); looking does not change it, nor trigger a warning.
    """
    native = _native.status()
    devices = {"cpu": choose(torch.device("cpu")), "cuda": choose(torch.device("cuda")), "other": "torch"}
    env_names = (ENV_VAR, _native.NO_NATIVE_ENV, "TRITON_INTERPRET", "TORCH_EXTENSIONS_DIR")
    return BackendInfo(
        choice=current(),
        choice_from=_choice_from,
        ops={name: dict(devices) for name in OPS},
        reasons={device: _reason(device, backend, native) for device, backend in devices.items()},
        native=native,
        triton=_triton(),
        env={name: os.environ.get(name) for name in env_names},
        package=_package(),
    )


def autotune_configs(configs: list) -> list:
    """All configs on a GPU; the first only under the interpreter (it cannot benchmark)."""
    return configs[:1] if interpreting() else configs


def _interpret_if_forced_without_gpu() -> None:
    # Runs at import: torch may import triton at any later point (through
    # torch._dynamo), after which its interpreter mode can no longer change.
    try:
        forced = requested() == "triton"
    except ValueError:
        return  # reported by use() when the ops are registered
    if forced and "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_if_forced_without_gpu()
