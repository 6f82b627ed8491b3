"""Build of the optional native CPU kernels ``mas_kernels._C`` (sources in ``csrc/``).

Everything else about the package is in ``pyproject.toml``. The extension is
compiled against the torch that is importable at build time, so install with
``pip install --no-build-isolation .`` after installing torch (``make`` does).

The build never fails the install: without torch at build time (a default
``pip install .``: pip's build isolation hides the installed torch), with
``MAS_KERNELS_NO_NATIVE=1``, or when the compiler fails, the package installs
without ``_C``. The C++ sources go into the wheel either way
(``mas_kernels/csrc``), and ``mas_kernels._native`` builds them on the first
import instead, cached per torch release (docs/install.md says why this way).

Flags: ``-O3``, ``-fno-math-errno`` and OpenMP; no ``-march=native``, so a wheel or a shared
environment built on one machine runs on any x86-64/arm64 one.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"mas_kernels setup: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Also copies ``csrc/`` into the wheel as ``mas_kernels/csrc``, for the first-import build."""

    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install finds csrc/ beside the package
            self.copy_tree(os.path.join(HERE, "csrc"), os.path.join(self.build_lib, "mas_kernels", "csrc"))


def _native_build():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with a message why not."""
    if os.environ.get("MAS_KERNELS_NO_NATIVE", "").strip() not in ("", "0"):
        _say("MAS_KERNELS_NO_NATIVE is set: not building the native CPU kernels")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # noqa: BLE001 - any failure here only means "no extension"
        _say(
            f"torch is not importable at build time ({type(exc).__name__}: {exc}); the native CPU kernels are "
            "not built (install torch first, then pip install --no-build-isolation .)"
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build ``_C`` if the compiler can; otherwise say why and install without it."""

        failed = False

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                self._skip(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._skip(exc)

        def copy_extensions_to_source(self):
            # Editable installs copy the built module into the tree: nothing to copy after a failure.
            if self.failed:
                return
            try:
                super().copy_extensions_to_source()
            except Exception as exc:  # noqa: BLE001
                self._skip(exc)

        def _skip(self, exc: BaseException) -> None:
            self.failed = True
            _say(
                f"building the native CPU kernels failed ({type(exc).__name__}: {exc}); installing without them, "
                "CPU ops will use the PyTorch path"
            )

    # The same flags as the first-import build (mas_kernels/_native.py: CXX_FLAGS, LINK_FLAGS).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    ext = CppExtension(
        name="mas_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # -fno-math-errno: sqrt without an errno branch, so loops with one vectorize (nothing reads errno).
        extra_compile_args={"cxx": ["-O3", "-g0", "-fno-math-errno", *openmp]},
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _native_build()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
