"""A new user's install, from a fresh venv: ``pip install <checkout>`` with pip's defaults (build isolation).

The checkout is copied as git sees it (tracked and untracked files, no build outputs such as an in-tree
``_C``), torch is installed first from a local wheel of the running release (never from the network: a
CUDA torch from PyPI is several GB), then the package with plain ``pip install``. The first import builds
the native CPU kernels (one progress line), later imports load the cached build without building, and
``mk.backend_info()`` says native serves CPU; the ops then agree with tests/reference.py. Run from the
copy's root, the source tree hides the installed package and ``backend_info`` says so.

Slow (~3 min on 2 cores: torch's wheel, the isolated build, the C++ build), so marked ``slow``; ``make test``
and CI run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv

import pytest
import torch

from mas_kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = _native._torch_release(torch.__version__)

pytestmark = pytest.mark.slow


def _copy_checkout(dst: str) -> None:
    """The files git would commit (tracked, and untracked but not ignored), as a fresh clone has them."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files to install cannot be told from build outputs")
    for rel in filter(None, out.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def _run(cmd: list[str], cwd: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


_CHECK = r"""
import importlib.util, torch, mas_kernels as mk
spec = importlib.util.spec_from_file_location("reference", REFERENCE)  # the oracle, not the package's tests
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
info = mk.backend_info()
print(info)
assert info.ops["penalty_grad_"]["cpu"] == "native" and info.native["available"], info
assert info.native["jit_dir"] and info.native["source"].startswith(info.native["jit_dir"]), info.native
assert info.package["path"].startswith(PREFIX) and info.package["shadows"] is None, info.package
omega, a, b = torch.rand(3, 4), torch.randn(6, 3), torch.randn(6, 4)
expected = ref.abs_outer(omega.clone(), a, b, 0.5)
mk.abs_outer_accumulate_(omega, a, b, 0.5)
torch.testing.assert_close(omega.double(), expected, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_pip_install_with_build_isolation_gives_native_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MAS_KERNELS_BACKEND", "MAS_KERNELS_NO_NATIVE", "VIRTUAL_ENV")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    src, prefix = str(tmp_path / "src"), str(tmp_path / "venv")
    _copy_checkout(src)
    venv.create(prefix, with_pip=True)
    py = os.path.join(prefix, "bin", "python")
    pip = [py, "-m", "pip", "install", "-q"]
    local = subprocess.run([*pip, "--no-index", "--no-deps", f"torch=={RELEASE}"], env=env, capture_output=True,
                           text=True, timeout=600)
    if local.returncode != 0:
        pytest.skip(f"no local wheel of torch=={RELEASE} (this test does not download torch): {local.stderr[-300:]}")
    _run([*pip, f"torch=={RELEASE}"], cwd=str(tmp_path), env=env)  # torch's own dependencies
    _run([*pip, src], cwd=str(tmp_path), env=env)

    # Outside the source tree: the installed package. The first import builds, once.
    check = _CHECK.replace("PREFIX", repr(prefix)).replace("REFERENCE", repr(os.path.join(src, "tests", "reference.py")))
    first = _run([py, "-c", check], cwd=str(tmp_path), env=env)
    assert first.stdout.strip().endswith("ok") and "building the native CPU kernels" in first.stderr, first.stderr
    again = _run([py, "-c", "import mas_kernels as mk; print(mk.backend_info())"], cwd=str(tmp_path), env=env)
    assert "cpu: native" in again.stdout and "building" not in again.stderr, again.stdout + again.stderr

    # From the checkout's root, the source tree is imported instead: backend_info says so.
    shadowed = _run([py, "-c", "import mas_kernels as mk; i = mk.backend_info(); print(i.package['shadows'])"],
                    cwd=src, env=env)
    assert shadowed.stdout.strip().startswith(prefix), shadowed.stdout + shadowed.stderr
