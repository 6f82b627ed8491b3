"""Loader of the native CPU kernels (built from ``csrc/``), which never fails at import.

Two ways to the same module, tried in this order by :func:`_load`:

1. ``mas_kernels._C``, compiled at install time by ``setup.py`` against the
   torch importable then (``pip install --no-build-isolation .`` after torch,
   or the ``make`` targets). Refused when it was built for another torch
   release (C++ ABIs differ between releases).
2. A build on first import (``torch.utils.cpp_extension.load``) from the C++
   sources shipped in the package, cached per torch release, Python version
   and source digest under ``TORCH_EXTENSIONS_DIR`` (default
   ``~/.cache/torch_extensions``) in ``mas_kernels/``. A default
   ``pip install .`` (build isolation: torch is not importable in pip's build
   environment, so step 1 has nothing) gets its kernels this way, once,
   ~1-2 min on 2 cores, with one progress line; every later import loads the
   cached module in milliseconds. Needs a C++ compiler and ninja (a
   dependency of the package).

``MAS_KERNELS_NO_NATIVE=1`` turns both off (and the build in ``setup.py``).
Where neither gives a module, :func:`available` is ``False``, one
``RuntimeWarning`` (the first time the ``auto`` backend needs the kernels)
says why and the command that fixes it, and the CPU ops use the PyTorch path.
:func:`status` describes what was found, for ``mk.backend_info()``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import threading
import time
import warnings

import torch

NO_NATIVE_ENV = "MAS_KERNELS_NO_NATIVE"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Compile flags of both builds (setup.py reads them from here): -O3 and OpenMP, no -march=native,
# so a module built on one machine runs on any x86-64/arm64 one.
OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
CXX_FLAGS = ["-O3", "-g0", *OPENMP]
LINK_FLAGS = list(OPENMP)
FIX_INSTALL = "pip install --no-build-isolation <checkout> (after torch, with a C++ compiler)"

_WARNED = False
_WARN_LOCK = threading.Lock()
_STATUS: dict = {}


def _torch_release(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"`` (the local build tag does not change the ABI)."""
    return version.split("+", 1)[0]


def disabled() -> bool:
    """True when ``MAS_KERNELS_NO_NATIVE`` asks for no native kernels."""
    return os.environ.get(NO_NATIVE_ENV, "").strip() not in ("", "0")


def sources_dir() -> str | None:
    """The folder of the C++ sources: ``mas_kernels/csrc`` in an installed wheel, ``csrc/`` beside the
    package in a checkout (editable install or source tree); ``None`` when neither has them."""
    for folder in (os.path.join(PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if glob.glob(os.path.join(folder, "*.cpp")):
            return folder
    return None


def _check_version(mod, origin: str):
    """``(mod, None)`` when ``mod`` was built for the running torch, else ``(None, why)``."""
    try:
        built = mod.torch_version()
    except Exception as exc:  # noqa: BLE001 - a module that cannot say what it was built for is not trusted
        return None, ImportError(f"{origin} does not report its torch version ({exc})")
    running = _torch_release(torch.__version__)
    if built != running:
        # Loading may even have worked, but C++ ABIs differ between releases.
        return None, ImportError(f"{origin} was built against torch {built} but torch {running} is running")
    return mod, None


def _installed():
    """The install-time ``mas_kernels._C``: ``(module, None)``, or ``(None, why not)``."""
    name = f"{__package__}._C"
    if name in sys.modules and sys.modules[name] is not None:
        mod = sys.modules[name]  # already imported (or put there by a test)
    elif name in sys.modules or not any(
        glob.glob(os.path.join(PACKAGE_DIR, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES
    ):
        return None, ImportError(
            "mas_kernels._C not built at install time (pip's default build isolation hides torch from setup.py)"
        )
    else:
        try:
            from . import _C as mod  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a broken .so (OSError, undefined symbol)
            return None, ImportError(f"mas_kernels._C does not load ({type(exc).__name__}: {exc})")
    return _check_version(mod, "mas_kernels._C")


def cache_dir(src: str) -> str:
    """Where the first-import build of the sources in ``src`` is cached for the running torch and Python."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(src, "*.cpp")) + glob.glob(os.path.join(src, "*.h"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(CXX_FLAGS + LINK_FLAGS).encode())
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"torch{_torch_release(torch.__version__)}-{sys.implementation.cache_tag}-{digest.hexdigest()[:12]}"
    return os.path.join(root, "mas_kernels", tag)


JIT_NAME = "mas_kernels_C"


def _import_built(folder: str):
    path = os.path.join(folder, JIT_NAME + (sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"))
    spec = importlib.util.spec_from_file_location(JIT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ninja_on_path() -> None:
    """torch's build runs ``ninja`` from PATH; the ``ninja`` package's binary may not be there (a venv's
    python run without activating the venv)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, path) if p)


def _jit():
    """The first-import build: ``(module, None, folder)``, or ``(None, why not, folder)``."""
    src = sources_dir()
    if src is None:
        return None, ImportError("the C++ sources (csrc/) are not in this installation"), None
    folder = cache_dir(src)
    done = os.path.join(folder, "done")
    if os.path.exists(done):
        try:
            return (*_check_version(_import_built(folder), f"the cached build in {folder}"), folder)
        except Exception as exc:  # noqa: BLE001 - a damaged cache: build again below
            os.remove(done)
            _STATUS["cache_error"] = f"{type(exc).__name__}: {exc}"
    from torch.utils import cpp_extension

    _ninja_on_path()
    os.makedirs(folder, exist_ok=True)
    print(f"mas_kernels: building the native CPU kernels for torch {_torch_release(torch.__version__)} (once per "
          f"torch release; about 1-2 min on 2 cores) in {folder} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        mod = cpp_extension.load(
            name=JIT_NAME,
            sources=sorted(glob.glob(os.path.join(src, "*.cpp"))),
            extra_include_paths=[src],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LINK_FLAGS,
            build_directory=folder,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a compile error: all mean "none"
        text = str(exc).strip().splitlines()
        tail = " | ".join(line.strip() for line in text[-3:] if line.strip())
        print(f"mas_kernels: the build failed after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return None, ImportError(f"building them on first import failed: {type(exc).__name__}: {tail}"), folder
    print(f"mas_kernels: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    mod, err = _check_version(mod, f"the build in {folder}")
    if mod is not None:
        with open(done, "w") as f:
            f.write(torch.__version__ + "\n")
    return mod, err, folder


@functools.lru_cache(maxsize=None)
def _load():
    """``(module, None)`` or ``(None, the exception that says why not)``; records what it found in ``_STATUS``."""
    if disabled():
        _STATUS.update(source=None, installed_error=None, jit_dir=None)
        return None, ImportError(f"{NO_NATIVE_ENV} is set")
    mod, installed_err = _installed()
    _STATUS.update(installed_error=None if installed_err is None else str(installed_err), jit_dir=None)
    if mod is not None:
        _STATUS["source"] = getattr(mod, "__file__", "mas_kernels._C")
        return mod, None
    mod, jit_err, folder = _jit()
    _STATUS["jit_dir"] = folder
    if mod is not None:
        _STATUS["source"] = getattr(mod, "__file__", folder)
        return mod, None
    _STATUS["source"] = None
    return None, ImportError(f"{installed_err}; {jit_err}")


def fix() -> str:
    """The one command (or setting) that gives native kernels, given why they are missing."""
    if disabled():
        return f"unset {NO_NATIVE_ENV}"
    err = load_error()
    if "ninja" in err.lower():
        return "pip install ninja"
    if sources_dir() is None:
        return FIX_INSTALL
    return "install a C++ compiler (e.g. apt-get install g++), then import mas_kernels again"


def _warn_once(err: BaseException) -> None:
    global _WARNED
    with _WARN_LOCK:
        if _WARNED:
            return
        _WARNED = True
    warnings.warn(
        f"mas_kernels: native CPU kernels unavailable ({err}); CPU ops use the PyTorch path (slower). "
        f"To get them: {fix()}. MAS_KERNELS_BACKEND=torch silences this",
        RuntimeWarning,
        stacklevel=4,
    )


def available() -> bool:
    """True when the native module loaded and matches the running torch; warns once when not."""
    mod, err = _load()
    if mod is None:
        _warn_once(err)
        return False
    return True


def lib():
    """The native module; ``RuntimeError`` saying why when it is unavailable."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"mas_kernels: native CPU kernels unavailable: {load_error()}")
    return mod


def load_error() -> str:
    """Why the native kernels are unavailable (``""`` when they are available)."""
    err = _load()[1]
    return "" if err is None else str(err)


def built() -> bool:
    """True when the native module loaded and matches the running torch (no warning)."""
    return _load()[0] is not None


def status() -> dict:
    """What the loader found: ``available``, ``source`` (the loaded file), ``reason`` and ``fix`` when
    unavailable, ``openmp``, and the first-import build's cache folder."""
    mod, _ = _load()
    out = {"available": mod is not None, "source": _STATUS.get("source"), "jit_dir": _STATUS.get("jit_dir")}
    if mod is None:
        out.update(reason=load_error(), fix=fix())
    else:
        out["openmp"] = bool(mod.has_openmp())
    return out
