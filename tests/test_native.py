"""The native CPU kernels (``mas_kernels._C``) against ``tests/reference.py``.

Each kernel test forces ``MAS_KERNELS_BACKEND=native`` and is skipped only when
the extension is not built. The reference is float64 from the same
low-precision inputs, so the differences allowed are fp32 arithmetic and one
rounding of an fp16/bf16 output. Also checked: non-contiguous views, tensors
that cross the kernels' chunk and threading thresholds, lists with aliased
tensors, determinism across thread counts, and the fallback when ``_C`` is
missing or built for another torch and the first-import build fails (one
warning naming the reason and the fix, PyTorch path, same results). The
first-import build itself is tested from a fresh venv in tests/test_install.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mas_kernels as mk
from mas_kernels import _backend, _native
from tests import reference as ref
from tests.helpers import (
    BF16, DTYPES, F16, F32, F64, HYPOTHESIS, LAYOUTS, assert_close, check_abs_accumulate, check_abs_outer,
    check_penalty_grad, make, penalty_inputs,
)

# Around the kernels' thresholds: 2**15 elements per chunk, threads from 2**16.
BIG = 2**16 + 2**15 + 3
EXAMPLES = 25  # hypothesis examples per test

needs_native = pytest.mark.skipif(
    not _native.available(), reason=f"native CPU kernels not built: {_native.load_error()}"
)


@pytest.fixture
def native():
    with _backend.using("native"):
        assert _backend.choose(torch.device("cpu")) == "native"
        yield


# ----------------------------------------------------------- penalty_grad_
@needs_native
@pytest.mark.parametrize("g_dtype", DTYPES)
@pytest.mark.parametrize("a_dtype", DTYPES)
@pytest.mark.parametrize("p_dtype", DTYPES)
def test_penalty_dtypes(native, p_dtype, a_dtype, g_dtype):
    shapes = [(0,), (1,), (7,), (3, 0, 2), (31, 33), (1000, 3), (BIG,)]
    params, anchors, omegas, grads = penalty_inputs(shapes, p_dtype, a_dtype, g_dtype)
    check_penalty_grad(params, anchors, omegas, 0.37, grads)


@needs_native
@pytest.mark.parametrize("layout", ["transposed", "step2", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_non_contiguous(native, dtype, layout):
    shapes = [(5, 7), (1, 9), (300, 301), (3, 4, 5)]
    layouts = [layout, "contiguous", layout, layout]
    params, anchors, omegas, grads = penalty_inputs(shapes, dtype, F32, dtype, layout=layouts,
                                                    anchor_layout=layouts[::-1], omega_layout=layouts,
                                                    grad_layout=layouts[::-1])
    check_penalty_grad(params, anchors, omegas, 0.37, grads)


@needs_native
def test_penalty_many_tensors(native):
    # A ResNet-like mix: many tiny tensors (biases, norms) and a few large ones.
    shapes = [(64,)] * 100 + [(3, 3, 8, 8)] * 50 + [(2048, 40), (BIG,), (0, 5)]
    params, anchors, omegas, grads = penalty_inputs(shapes, BF16, F32, F32)
    check_penalty_grad(params, anchors, omegas, 0.37, grads)


@needs_native
def test_penalty_value_is_accurate_on_large_sums(native):
    # 4M terms of similar size: a plain fp32 running sum would drift by ~1e-4.
    n = 1 << 22
    p, a, o = torch.full((n,), 1.1), torch.zeros(n), torch.full((n,), 0.3)
    value = mk.penalty_grad_([p], [a], [o], 1.0, [torch.zeros(n)])
    expected = n * o[0].item() * p[0].item() ** 2  # the fp32 inputs, exactly, in double
    assert abs(value.item() - expected) <= 1e-6 * expected


@needs_native
def test_penalty_deterministic_across_thread_counts(native):
    params, anchors, omegas, grads = penalty_inputs([(BIG,), (4 * BIG,), (17,)])
    threads = torch.get_num_threads()
    values = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            values.append(mk.penalty_grad_(params, anchors, omegas, 0.5, [g.clone() for g in grads]).item())
    finally:
        torch.set_num_threads(threads)
    assert values[0] == values[1] == values[2]


@needs_native
def test_penalty_aliased_lists_match_sequential_torch_path(native, monkeypatch):
    # The same grad buffer twice, and a grad that is its own entry's param: the
    # kernels must give what one-tensor-after-another gives. (A param that is
    # another entry's grad is refused: tests/test_ops_guard.py.)
    shared = torch.randn(BIG)
    p1 = torch.randn(BIG)
    anchors = [torch.randn(BIG), torch.randn(BIG), torch.randn(BIG)]
    omegas = [torch.rand(BIG) for _ in range(3)]

    def run():
        g, h = shared.clone(), torch.randn(BIG, generator=torch.Generator().manual_seed(1))
        params = [p1.clone(), g, p1.clone()]
        grads = [h, g, h]
        value = mk.penalty_grad_(params, anchors, omegas, 0.25, grads)
        return value, grads

    value_native, grads_native = run()
    with _backend.using("torch"):
        value_torch, grads_torch = run()
    assert_close(value_native, value_torch.to(F64), rtol=1e-5, name="value")
    for i, (x, y) in enumerate(zip(grads_native, grads_torch)):
        assert_close(x, y.to(F64), y.abs().to(F64) + 1.0, name=f"grads[{i}]")


@needs_native
def test_penalty_differentiable_form_uses_native(native):
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(BIG, requires_grad=True)]
    anchors = [p.detach() + torch.randn_like(p) for p in params]
    omegas = [torch.rand_like(p) for p in params]
    value = mk.penalty(params, anchors, omegas, 0.5)
    value.backward()
    value_ref, grads_ref = ref.penalty_and_grads(
        [p.detach() for p in params], anchors, omegas, 0.5, [torch.zeros_like(p) for p in params]
    )
    assert_close(value.detach(), value_ref, rtol=1e-5, name="value")
    for i, (p, g_ref) in enumerate(zip(params, grads_ref)):
        assert_close(p.grad, g_ref, name=f"params[{i}].grad")


_SHAPES = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@needs_native
@settings(max_examples=EXAMPLES, **HYPOTHESIS)
@given(
    shapes=_SHAPES,
    dtypes=st.tuples(*[st.sampled_from(DTYPES)] * 3),
    layout=st.sampled_from(LAYOUTS),
    lam=st.floats(0.0, 10.0),
)
def test_penalty_hypothesis(native, shapes, dtypes, layout, lam):
    params, anchors, omegas, grads = penalty_inputs(shapes, *dtypes, layout=layout, anchor_layout=layout,
                                                    omega_layout=layout)
    check_penalty_grad(params, anchors, omegas, lam, grads)


@needs_native
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_conversions_bit_exact(native, dtype):
    # The kernels convert fp16/bf16 with their own vectorisable bit tricks:
    # loading must match PyTorch for every one of the 65536 bit patterns, and
    # storing must round like PyTorch (to nearest even, overflow to inf).
    t = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    o = torch.zeros(t.numel())
    mk.abs_accumulate_([o], [t], 1.0)
    expected = t.float().abs()
    same = (o.view(torch.int32) == expected.view(torch.int32)) | (o.isnan() & expected.isnan())
    assert same.all(), f"{int((~same).sum())} fp32 values of {dtype} bit patterns differ from PyTorch's"
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(200_000, generator=gen) * 10.0 ** torch.randint(-9, 7, (200_000,), generator=gen).float(),
        torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int32).view(F32),
        torch.tensor([float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, 6.1e-5, 5.96e-8,
                      2.98e-8, 2.99e-8, 1e-45, 3.4e38, -3.4e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]),
    ])
    x = x[x != 0]  # 0 + (-0) is +0: a sign of zero the sum, not the conversion, decides
    g = torch.zeros(x.numel(), dtype=dtype)
    mk.penalty_grad_([x], [torch.zeros_like(x)], [torch.ones_like(x)], 0.5, [g])  # g = 0 + 2 * 0.5 * x
    expected = x.to(dtype)
    same = (g.view(torch.int16) == expected.view(torch.int16)) | (g.isnan() & expected.isnan())
    assert same.all(), f"{int((~same).sum())} fp32 values rounded to {dtype} differ from PyTorch's"


# ---------------------------------------------------------- abs_accumulate_
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_accumulate_shapes(native, dtype):
    shapes = [(0,), (1,), (7,), (1000, 3), (2, 0), (BIG,)]
    check_abs_accumulate([torch.rand(s) for s in shapes], [torch.randn(s).to(dtype) for s in shapes], 0.3)


@needs_native
@pytest.mark.parametrize("layout", ["transposed", "step2", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_accumulate_non_contiguous(native, dtype, layout):
    shapes = [(5, 7), (300, 301), (1, 3)]
    # Non-contiguous omegas are views into a larger buffer: nothing outside them may change.
    buffers = [torch.rand(2 * s[0] + 1, 2 * s[1] + 1) for s in shapes]
    omegas = [b[1:1 + s[0], : 2 * s[1] : 2] for b, s in zip(buffers, shapes)]
    before = [b.clone() for b in buffers]
    expected_views = [o.clone() for o in omegas]
    tensors = [make(s, dtype, layout) for s in shapes]
    expected = ref.abs_accumulate(expected_views, tensors, 0.3)
    mk.abs_accumulate_(omegas, tensors, 0.3)
    for i, (b, b0, o, e, s) in enumerate(zip(buffers, before, omegas, expected, shapes)):
        assert_close(o, e, name=f"omegas[{i}]")
        untouched = torch.ones_like(b, dtype=torch.bool)
        untouched[1:1 + s[0], : 2 * s[1] : 2] = False
        assert torch.equal(b[untouched], b0[untouched]), f"omegas[{i}]: memory outside the view changed"


@needs_native
def test_abs_accumulate_many_tensors_and_aliases(native):
    shapes = [(64,)] * 200 + [(BIG,)]
    omegas = [torch.rand(s) for s in shapes]
    tensors = [torch.randn(s).to(BF16) for s in shapes]
    check_abs_accumulate(omegas, tensors, 0.3)
    # One omega twice: accumulated twice, as in the PyTorch path.
    o, t = torch.rand(BIG), torch.randn(BIG)
    expected = o.to(F64) + 2 * 0.3 * t.to(F64).abs()
    mk.abs_accumulate_([o, o], [t, t], 0.3)
    assert_close(o, expected, name="aliased omega")


@needs_native
@settings(max_examples=EXAMPLES, **HYPOTHESIS)
@given(
    shapes=_SHAPES,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    alpha=st.floats(0.0, 3.0),
)
def test_abs_accumulate_hypothesis(native, shapes, dtype, layout, alpha):
    tensors = [make(s, dtype, layout) for s in shapes]
    check_abs_accumulate([torch.rand(s) for s in shapes], tensors, alpha)


# ------------------------------------------------------ abs_outer_accumulate_
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,j,i", [(0, 3, 4), (1, 1, 1), (7, 5, 3), (1003, 7, 9), (33, 130, 257)])
def test_abs_outer_shapes(native, dtype, n, j, i):
    check_abs_outer(torch.rand(j, i), torch.randn(n, j).to(dtype), torch.randn(n, i).to(dtype), 0.5)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_outer_non_contiguous(native, dtype):
    n, j, i = 37, 11, 13
    a = torch.randn(j, n).to(dtype).T  # transposed view: dense, other strides
    b = torch.randn(n, 2 * i).to(dtype)[:, ::2]  # strided: not dense
    buffer = torch.rand(i, j + 3)
    omega = buffer[:, 2:2 + j].T  # non-contiguous output inside a larger buffer
    before = buffer.clone()
    check_abs_outer(omega, a, b, 0.5)
    assert torch.equal(buffer[:, :2], before[:, :2]) and torch.equal(buffer[:, 2 + j:], before[:, 2 + j:])


@needs_native
def test_abs_outer_mixed_dtypes_and_large_abs_pass(native):
    # Large enough for the threaded abs pass; a and b of different dtypes.
    n, j, i = 600, 130, 120
    check_abs_outer(torch.rand(j, i), torch.randn(n, j).to(BF16), torch.randn(n, i).to(F16), alpha=1.0 / n)


@needs_native
@settings(max_examples=EXAMPLES, **HYPOTHESIS)
@given(
    n=st.integers(0, 40), j=st.integers(1, 12), i=st.integers(1, 12),
    dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)),
    transpose=st.tuples(st.booleans(), st.booleans()),
    alpha=st.floats(0.0, 2.0),
)
def test_abs_outer_hypothesis(native, n, j, i, dtypes, transpose, alpha):
    a = torch.randn(j, n).to(dtypes[0]).T if transpose[0] else torch.randn(n, j).to(dtypes[0])
    b = torch.randn(i, n).to(dtypes[1]).T if transpose[1] else torch.randn(n, i).to(dtypes[1])
    check_abs_outer(torch.rand(j, i), a, b, alpha)


# ------------------------------------------------------------------ loading
@needs_native
def test_module_matches_running_torch():
    assert _native.lib().torch_version() == _native._torch_release(torch.__version__)
    assert _native.load_error() == ""


_OTHER_TORCH = r"""
import sys, types, warnings
# A mas_kernels._C built for another torch release: it says so, and offers nothing else
# (registering its kernels would fail with an AttributeError).
fake = types.ModuleType("mas_kernels._C")
fake.torch_version = lambda: "0.0.1"
sys.modules["mas_kernels._C"] = fake
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import mas_kernels as mk
    from mas_kernels import _backend, _native

    assert not _native.available()
    assert _backend.choose(torch.device("cpu")) == "torch"
    out = mk.penalty_grad_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], 1.0, [torch.zeros(3)])
    assert out.item() == 3.0
why = _native.load_error()
assert "built against torch 0.0.1" in why and "building them on first import failed" in why, why
ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "native CPU kernels" in str(w.message)]
assert len(ours) == 1 and "built against torch 0.0.1" in ours[0], ours
try:
    mk.use_backend("native")
    raise AssertionError("native forced with a module built for another torch")
except RuntimeError as exc:
    assert "built against torch 0.0.1" in str(exc), str(exc)
print("ok")
"""


def test_module_built_for_other_torch_is_refused(tmp_path):
    # In a fresh interpreter whose mas_kernels._C reports another torch release:
    # not loaded, the reason named (warning, load_error, forcing native), the PyTorch path serves CPU.
    _run_fresh(_OTHER_TORCH, tmp_path)


_WITHOUT_C = r"""
import sys, warnings
sys.modules["mas_kernels._C"] = None  # as if it was never built: importing it fails
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import mas_kernels as mk
    from mas_kernels import _backend, _native

    # nothing native on the dispatcher's CPU key: the PyTorch kernels serve CPU
    assert _backend.choose(torch.device("cpu")) == "torch"
    from tests.helpers import (BF16, F32, check_abs_accumulate, check_abs_outer, check_penalty_grad,
                               penalty_inputs)

    assert not _native.available()
    for _ in range(2):
        params, anchors, omegas, grads = penalty_inputs([(5, 3), (0,), (4,)], BF16, F32, F32)
        check_penalty_grad(params, anchors, omegas, 0.37, grads)
        check_abs_accumulate([torch.rand(6)], [torch.randn(6)], 0.3)
        check_abs_outer(torch.rand(3, 4), torch.randn(5, 3), torch.randn(5, 4), 0.5)
ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "native CPU kernels" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
message = str(ours[0].message)
assert "not built at install time" in message and "PyTorch path" in message, message
assert "building them on first import failed" in message and "install a C++ compiler" in message, message
info = mk.backend_info()
assert info.ops["penalty_grad_"]["cpu"] == "torch" and not info.native["available"], info
assert info.native["reason"] in info.reasons["cpu"] and info.native["fix"] in info.reasons["cpu"], info
try:
    _native.lib()
    raise AssertionError("lib() without the module")
except RuntimeError as exc:
    assert "native CPU kernels unavailable" in str(exc)
# Forcing the native path without the module is an error that says why, and changes nothing.
try:
    mk.use_backend("native")
    raise AssertionError("native forced without the module")
except RuntimeError as exc:
    assert "C++ kernels are not available" in str(exc)
assert _backend.choose(torch.device("cpu")) == "torch" and _backend.current() == "auto"
print("ok")
"""


def _run_fresh(script: str, tmp_path) -> None:
    """Run ``script`` in a new interpreter (no backend override in its environment); it prints "ok" at the end.

    The first-import build there fails at once, as on a machine without a C++ compiler (``CXX=false``), into an
    empty cache."""
    env = {k: v for k, v in os.environ.items() if k not in (_backend.ENV_VAR, _native.NO_NATIVE_ENV)}
    env.update(CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    # In a fresh interpreter where mas_kernels._C cannot be imported, as on a
    # machine without a compiler.
    _run_fresh(_WITHOUT_C, tmp_path)


_DISABLED = r"""
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import mas_kernels as mk
    mk.abs_accumulate_([torch.zeros(3)], [torch.ones(3)], 1.0)
info = mk.backend_info()
assert info.native == {"available": False, "source": None, "jit_dir": None, "reason": "MAS_KERNELS_NO_NATIVE is set",
                       "fix": "unset MAS_KERNELS_NO_NATIVE"}, info.native
assert info.env["MAS_KERNELS_NO_NATIVE"] == "1" and info.ops["abs_accumulate_"]["cpu"] == "torch", info
ours = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
assert len(ours) == 1 and "MAS_KERNELS_NO_NATIVE is set" in ours[0], ours
print("ok")
"""


def test_no_native_setting_loads_and_builds_nothing(tmp_path):
    # MAS_KERNELS_NO_NATIVE=1: no install-time module, no first-import build (nothing in the cache), one warning.
    env_script = "import os; os.environ['MAS_KERNELS_NO_NATIVE'] = '1'\n" + _DISABLED
    _run_fresh(env_script, tmp_path)
    assert not any(tmp_path.iterdir())


@needs_native
def test_the_dispatcher_picks_the_kernel_and_nothing_is_chosen_per_call(monkeypatch):
    # The native C++ kernels sit on the CPU key; use_backend("torch") puts the
    # Python kernels there instead (seen through the PyTorch path they run), and
    # back. The environment is read once, at import: changing it later does nothing.
    import importlib

    pen = importlib.import_module("mas_kernels.ops.penalty")
    outer = importlib.import_module("mas_kernels.ops.abs_outer")
    calls = []
    monkeypatch.setattr(pen, "penalty_grad_torch", lambda *a: calls.append("penalty") or torch.zeros(()))
    monkeypatch.setattr(outer, "abs_outer_torch", lambda *a: calls.append("abs_outer"))
    args = ([torch.randn(3)], [torch.randn(3)], [torch.rand(3)], 1.0, [torch.zeros(3)])
    omega, a, b = torch.zeros(2, 3), torch.randn(4, 2), torch.randn(4, 3)
    assert _backend.choose(torch.device("cpu")) == "native"
    for choice, python in (("native", False), ("auto", False), (" Native ", False), ("torch", True), ("auto", False)):
        with _backend.using(choice):
            calls.clear()
            torch.ops.mas_kernels.penalty_grad_(*args)
            torch.ops.mas_kernels.abs_outer_accumulate_(omega, a, b, 1.0)
            assert calls == (["penalty", "abs_outer"] if python else []), choice
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    calls.clear()
    torch.ops.mas_kernels.penalty_grad_(*args)
    assert calls == []
    with pytest.raises(ValueError, match="'bogus'"):
        mk.use_backend("bogus")
    assert _backend.choose(torch.device("cpu")) == "native"


def test_an_invalid_backend_in_the_environment_fails_at_import():
    env = {**os.environ, _backend.ENV_VAR: "bogus"}
    proc = subprocess.run([sys.executable, "-c", "import mas_kernels"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "MAS_KERNELS_BACKEND='bogus'" in proc.stderr, proc.stderr

# ------------------------------------------------------------ backend_info
def test_backend_info_names_the_kernel_of_every_op_on_every_device():
    from mas_kernels.ops._library import OPS

    for choice in _backend.CHOICES[:2] + (("native",) if _native.available() else ()):
        with _backend.using(choice):
            info = mk.backend_info()
            assert info.choice == choice and info.choice_from == "mk.use_backend"
            assert set(info.ops) == set(OPS) and set(info.reasons) == {"cpu", "cuda", "other"}
            for name, where in info.ops.items():
                # what the dispatcher runs, as _backend.choose sees it
                assert where == {"cpu": _backend.choose(torch.device("cpu")),
                                 "cuda": _backend.choose(torch.device("cuda")), "other": "torch"}, name
            text = str(info)
            assert all(f"  {device}: " in text for device in info.reasons), text
            if choice == "torch":
                assert info.ops["penalty_grad_"]["cpu"] == "torch" and "as asked" in info.reasons["cpu"]
            if choice == "native":
                assert info.ops["penalty_grad_"]["cpu"] == "native"
                assert os.path.isfile(info.native["source"]) and info.native["source"] in info.reasons["cpu"]
    assert info.env.keys() == {"MAS_KERNELS_BACKEND", "MAS_KERNELS_NO_NATIVE", "TRITON_INTERPRET",
                               "TORCH_EXTENSIONS_DIR"}
    assert info.triton["installed"] == _backend.has_triton() and info.triton["interpreter"] == _backend.interpreting()
    assert info.package["path"] == os.path.dirname(os.path.abspath(mk.__file__))
