"""Loader for the native CPU kernels (``mas_kernels._C``, built from ``csrc/``).

Importing never fails: where the extension is absent the CPU ops use the
PyTorch path.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built against another torch
        return None, exc
    return _C, None


def available() -> bool:
    return _load()[0] is not None


def lib():
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"mas_kernels: native CPU kernels unavailable: {err}")
    return mod


def load_error() -> str:
    err = _load()[1]
    return "" if err is None else f"{type(err).__name__}: {err}"
