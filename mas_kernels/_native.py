"""Loader for the native CPU kernels (``mas_kernels._C``, built from ``csrc/``).

``setup.py`` compiles ``csrc/*.cpp`` against the installed torch when the
package is installed (``pip install --no-build-isolation .``); the build is
optional. Importing never fails: where the module is absent, fails to load, or
was built for another torch release, :func:`available` is ``False``, one
``RuntimeWarning`` says why (the first time the ``auto`` backend looks for it),
and the CPU ops use the PyTorch path.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch

_WARNED = False
_WARN_LOCK = threading.Lock()


def _torch_release(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"`` (the local build tag does not change the ABI)."""
    return version.split("+", 1)[0]


@functools.lru_cache(maxsize=None)
def _load():
    """``(module, None)`` or ``(None, the exception that says why not)``."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - not built (ImportError), or a broken .so (OSError, undefined symbol)
        return None, exc

    try:
        built = _C.torch_version()
    except Exception as exc:  # noqa: BLE001 - a module that cannot say what it was built for is not trusted
        return None, ImportError(f"mas_kernels._C does not report its torch version ({exc})")
    running = _torch_release(torch.__version__)
    if built != running:
        # Loading may even have worked, but C++ ABIs differ between releases.
        return None, ImportError(f"mas_kernels._C was built against torch {built} but torch {running} is running")
    return _C, None


def _warn_once(err: BaseException) -> None:
    global _WARNED
    with _WARN_LOCK:
        if _WARNED:
            return
        _WARNED = True
    warnings.warn(
        f"mas_kernels: native CPU kernels unavailable ({type(err).__name__}: {err}); CPU ops use the PyTorch "
        "path (slower). To build them: pip install --no-build-isolation -e . (needs a C++ compiler), "
        "or set MAS_KERNELS_BACKEND=torch to silence this",
        RuntimeWarning,
        stacklevel=4,
    )


def available() -> bool:
    """True when ``_C`` loaded and matches the running torch; warns once when not."""
    mod, err = _load()
    if mod is None:
        _warn_once(err)
        return False
    return True


def lib():
    """The ``_C`` module; ``RuntimeError`` saying why when it is unavailable."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"mas_kernels: native CPU kernels unavailable: {load_error()}")
    return mod


def load_error() -> str:
    """Why the native kernels are unavailable (``""`` when they are available)."""
    err = _load()[1]
    return "" if err is None else f"{type(err).__name__}: {err}"


def built() -> bool:
    """True when ``_C`` loaded and matches the running torch (no warning)."""
    return _load()[0] is not None
