"""``abs_bmm_accumulate_`` against ``tests/reference.py`` on every backend.

``omega += alpha * sum_s |a_s^T b_s|``: the reference is float64, one sample and
one position at a time, from the same low-precision inputs, so the only
differences allowed are float32 accumulation (the products of fp32, bf16 and
fp16 inputs are exact in fp32). Tolerances are relative to the sum of the
magnitudes of the terms, ``|omega| + |alpha| sum_s sum_t |a_st| |b_st|^T``.

Also here: the abs after the sum over positions (a test that a per-position
abs would fail), T = 1 as ``abs_outer_accumulate_``, the memory budget (chunk
plans, and the scratch the PyTorch path allocates, counted), each strategy of
the native kernel, bad input, and the op as a ``torch.library`` op.
"""

from __future__ import annotations

import math
import re
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mas_kernels as mk
from mas_kernels import _native
from mas_kernels.ops import abs_bmm as op
from tests import reference as ref
from tests.helpers import BF16, DTYPES, F16, F32, HYPOTHESIS, assert_close, make, using_backend

C64 = torch.complex64  # float64 is supported (tests/test_ops_float64.py); complex is not
OPS = torch.ops.mas_kernels
META = torch.device("meta")
LAYOUTS3 = ["contiguous", "transposed", "step2", "offset", "positions_first"]

_INFO = mk.backend_info()
needs_native = pytest.mark.skipif(not _INFO.native["available"],
                                  reason=f"native CPU kernels unavailable: {_INFO.native.get('reason')}")
needs_triton = pytest.mark.skipif(not _INFO.triton["installed"], reason="Triton is not installed")


def make3(shape, dtype=F32, layout="contiguous"):
    """A (S, T, C) input; ``positions_first``: a view of a (T, S, C) tensor, as sequence-first models give."""
    if layout == "positions_first":
        S, T, C = shape
        return torch.randn(T, S, C).to(dtype).transpose(0, 1)
    return make(shape, dtype, layout)


def scale_of(omega, a, b, alpha):
    """The sum of the magnitudes of the terms: every (sample, position) outer product, abs."""
    rows_a = a.reshape(-1, a.shape[2]) if a.numel() else a.new_zeros(0, a.shape[2])
    rows_b = b.reshape(-1, b.shape[2]) if b.numel() else b.new_zeros(0, b.shape[2])
    return ref.abs_outer(omega.abs(), rows_a, rows_b, abs(alpha))


def check(omega, a, b, alpha=0.5, **kwargs):
    expected = ref.abs_bmm(omega.cpu(), a.cpu(), b.cpu(), alpha)
    scale = scale_of(omega.cpu(), a.cpu(), b.cpu(), alpha)
    out = mk.abs_bmm_accumulate_(omega, a, b, alpha, **kwargs)
    assert out is omega and omega.dtype == F32
    assert_close(omega, expected, scale, name="omega")
    return expected


# ------------------------------------------------------------------ the formula
@pytest.mark.parametrize("S, T, J, I", [(1, 1, 1, 1), (3, 5, 7, 9), (2, 17, 33, 65), (4, 2, 1, 130), (5, 3, 70, 1),
                                        (2, 40, 16, 48), (1, 64, 20, 18)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, device, S, T, J, I, dtype):
    check(make((J, I), fill="rand", device=device), make((S, T, J), dtype, device=device),
          make((S, T, I), dtype, device=device))


@pytest.mark.parametrize("dta, dtb", [(F16, BF16), (BF16, F16), (BF16, F32), (F32, F16)], ids=str)
def test_mixed_dtypes(backend, device, dta, dtb):
    check(make((13, 21), fill="rand", device=device), make((3, 19, 13), dta, device=device),
          make((3, 19, 21), dtb, device=device), 1 / 3)


@pytest.mark.parametrize("alpha", [1.0, 1 / 7, 2.5, 0.0])  # alpha < 0: tests/test_ops_guard.py
def test_alpha(backend, alpha):
    check(make((6, 5), fill="rand"), make((4, 3, 6)), make((4, 3, 5)), alpha)


def test_abs_is_taken_after_the_sum_over_positions(backend):
    # One sample, two positions whose products cancel: |1*1 + 1*(-1)| = 0, not 2.
    omega = torch.zeros(1, 2)
    a = torch.tensor([[[1.0], [1.0]]])               # (S=1, T=2, J=1)
    b = torch.tensor([[[1.0, 3.0], [-1.0, 2.0]]])    # (S=1, T=2, I=2)
    mk.abs_bmm_accumulate_(omega, a, b)
    assert omega.tolist() == [[0.0, 5.0]]
    # Random signs: the exact rule is strictly below the per-position abs, and is what we get.
    a, b = make((6, 9, 11)), make((6, 9, 7))
    omega = torch.zeros(11, 7)
    expected = check(omega, a, b, 1.0)
    per_position = ref.abs_outer(torch.zeros(11, 7), a.reshape(-1, 11), b.reshape(-1, 7), 1.0)
    assert (per_position - expected).min() > 1e-3


def test_is_not_transposed(backend):
    # J == I, so reading a and b swapped (or writing omega transposed) would still fit the shape.
    a = torch.tensor([[[1.0, -2.0], [0.0, 3.0]]])
    b = torch.tensor([[[5.0, 7.0], [-11.0, 13.0]]])
    omega = torch.zeros(2, 2)
    mk.abs_bmm_accumulate_(omega, a, b)
    assert omega.tolist() == [[5.0, 7.0], [abs(-10.0 - 33.0), abs(-14.0 + 39.0)]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_position_is_abs_outer(backend, dtype):
    a, b = make((37, 1, 21), dtype), make((37, 1, 30), dtype)
    got, want = make((21, 30), fill="rand"), None
    want = got.clone()
    mk.abs_bmm_accumulate_(got, a, b, 0.25)
    mk.abs_outer_accumulate_(want, a[:, 0], b[:, 0], 0.25)
    assert torch.equal(got, want)
    check(make((21, 30), fill="rand"), a, b, 0.25)


def test_empty(backend):
    omega = torch.rand(3, 4)
    before = omega.clone()
    for S, T in [(0, 5), (5, 0), (0, 0)]:
        assert mk.abs_bmm_accumulate_(omega, torch.randn(S, T, 3), torch.randn(S, T, 4, dtype=BF16)) is omega
        torch.ops.mas_kernels.abs_bmm_accumulate_(omega, torch.randn(S, T, 3), torch.randn(S, T, 4), 1.0, 1 << 20)
    assert torch.equal(omega, before)
    for J, I in [(0, 4), (3, 0), (0, 0)]:
        empty = torch.zeros(J, I)
        assert mk.abs_bmm_accumulate_(empty, torch.randn(2, 3, J), torch.randn(2, 3, I)) is empty


@pytest.mark.parametrize("la", LAYOUTS3)
@pytest.mark.parametrize("lb", ["contiguous", "transposed", "positions_first"])
def test_strided_inputs(backend, la, lb):
    check(make((18, 22), fill="rand", layout="transposed"), make3((3, 11, 18), F16, la), make3((3, 11, 22), BF16, lb),
          0.75)


@pytest.mark.parametrize("lo", ["transposed", "step2", "offset"])
def test_strided_omega(backend, lo):
    check(make((9, 14), fill="rand", layout=lo), make((2, 6, 9)), make((2, 6, 14)))


_dim = st.one_of(st.sampled_from([1, 2, 15, 16, 17, 33]), st.integers(1, 40))


@settings(max_examples=25, **HYPOTHESIS)
@given(
    S=st.integers(0, 4), T=st.one_of(st.sampled_from([0, 1, 2, 16, 17]), st.integers(1, 40)), J=_dim, I=_dim,
    dta=st.sampled_from(DTYPES), dtb=st.sampled_from(DTYPES),
    la=st.sampled_from(LAYOUTS3), lb=st.sampled_from(LAYOUTS3),
    lo=st.sampled_from(["contiguous", "transposed", "offset"]),
    alpha=st.sampled_from([1.0, 0.25, 1.5]),
)
def test_hypothesis(backend, S, T, J, I, dta, dtb, la, lb, lo, alpha):
    check(make((J, I), F32, lo, fill="rand"), make3((S, T, J), dta, la), make3((S, T, I), dtb, lb), alpha)


# ------------------------------------------------------------- memory budget
class ScratchCounter(TorchDispatchMode):
    """Counts the bytes of the storages the ops called under it create, live at once: the peak.

    A storage is freed when the last tensor object viewing it dies (a weakref
    finalizer per tensor object); storages of the inputs are not counted.
    Allocations inside one op (its own temporaries) are not seen, only its outputs.
    """

    def __init__(self, *inputs):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.known or storage.nbytes() == 0:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def test_scratch_counter_counts():
    # The counter itself: two live 4 KiB buffers, then one.
    x = torch.zeros(8)
    with ScratchCounter(x) as counter:
        y = torch.empty(1024) + 1
        z = (y * 2).t()
        del y
        w = z + 1
        del z, w
    assert counter.peak == 2 * 4096 and counter.live == 0


@pytest.mark.parametrize("S, T, J, I, dtype", [(6, 40, 70, 90, F32), (3, 300, 64, 64, BF16), (2, 600, 64, 64, F16),
                                                (2, 20, 200, 150, F32), (5, 1, 100, 80, BF16)])
@pytest.mark.parametrize("budget", [64 << 10, 200 << 10, 1 << 20])
def test_torch_path_scratch_stays_within_the_budget(S, T, J, I, dtype, budget):
    # The PyTorch path itself (what the torch backend registers), so that the counter sees its ops.
    a, b = make((S, T, J), dtype), make((S, T, I), dtype)
    omega = make((J, I), fill="rand")
    expected, scale = ref.abs_bmm(omega, a, b, 0.5), scale_of(omega, a, b, 0.5)
    with torch.no_grad(), ScratchCounter(omega, a, b) as counter:
        op.abs_bmm_torch(omega, a, b, 0.5, budget)
    assert_close(omega, expected, scale, name="omega")
    assert 0 < counter.peak <= budget, (counter.peak, budget)
    if T > 1 and budget < 1 << 20:
        assert op.chunk_plan(S, T, J, I, budget) != (S, T, J, I), "the budget should force chunking here"


@settings(max_examples=200, deadline=None)
@given(S=st.integers(1, 10**4), T=st.integers(2, 10**5), J=st.integers(1, 10**4), I=st.integers(1, 10**4),
       budget=st.integers(op.MIN_MEMORY_BUDGET, 1 << 30))
def test_chunk_plan_fits_the_budget(S, T, J, I, budget):
    s, t, j, i = op.chunk_plan(S, T, J, I, budget)
    assert 1 <= s <= S and 1 <= t <= T and 1 <= j <= J and 1 <= i <= I
    assert op.chunk_bytes(s, t, j, i) <= budget
    if op.chunk_bytes(1, T, J, I) <= budget:
        assert (t, j, i) == (T, J, I)  # whole samples whenever one fits


def test_default_budget_and_its_setting(monkeypatch):
    a, b = make((4, 30, 50)), make((4, 30, 40))
    omega = make((50, 40), fill="rand")
    seen = []
    real = torch.ops.mas_kernels.abs_bmm_accumulate_
    monkeypatch.setattr(torch.ops.mas_kernels, "abs_bmm_accumulate_",
                        lambda o, x, y, alpha, budget: seen.append(budget) or real(o, x, y, alpha, budget))
    mk.abs_bmm_accumulate_(omega, a, b)
    assert op.DEFAULT_MEMORY_BUDGET == 256 << 20 and seen == [256 << 20]
    monkeypatch.setattr(op, "DEFAULT_MEMORY_BUDGET", 1 << 20)
    mk.abs_bmm_accumulate_(omega, a, b)
    mk.abs_bmm_accumulate_(omega, a, b, memory_budget=300 << 10)
    assert seen[1:] == [1 << 20, 300 << 10]


def test_budget_does_not_change_the_result(backend):
    a, b = make((5, 37, 60)), make((5, 37, 45))
    results = []
    for budget in (op.MIN_MEMORY_BUDGET, 100 << 10, 64 << 20):
        omega = torch.zeros(60, 45)
        check(omega, a, b, 1.0, memory_budget=budget)
        results.append(omega)
    scale = scale_of(torch.zeros(60, 45), a, b, 1.0)
    for r in results[1:]:
        assert_close(r, results[0].double(), scale, name="omega, another budget")


def test_triton_splits_fit_the_budget():
    from mas_kernels.ops.triton.abs_bmm import splits

    for S, J, I, budget, programs in [(64, 64, 576, 64 << 20, 132), (64, 1024, 1024, 64 << 20, 132),
                                      (8, 64, 64, 64 << 10, 132), (1, 64, 64, 64 << 20, 132), (100, 8, 8, 1 << 20, 4)]:
        n = splits(S, J, I, budget, programs)
        assert 1 <= n <= S
        assert n == 1 or (n + 1) * 4 * J * I <= budget
        assert math.ceil(S / math.ceil(S / n)) == n  # every split has samples


@needs_triton
def test_triton_kernel_sample_splits():
    # The kernel itself, called directly (on CPU tensors: under the interpreter), with its samples
    # split over programs (partial sums, then their sum) and with T = 1, which the op sends to abs_outer.
    from mas_kernels.ops.triton.abs_bmm import launch

    for S, T, J, I, programs, dta, dtb in [(7, 5, 20, 30, 64, BF16, F16), (3, 1, 17, 9, 64, F32, F32),
                                           (5, 33, 16, 16, 1, F16, F16), (6, 3, 9, 21, 64, F32, BF16)]:
        a, b = make((S, T, J), dta), make((S, T, I), dtb)
        omega = make((J, I), fill="rand")
        expected, scale = ref.abs_bmm(omega, a, b, -0.5), scale_of(omega, a, b, -0.5)
        launch(omega, a, b, -0.5, 64 << 20, programs=programs)
        assert_close(omega, expected, scale, name=f"omega (S={S}, T={T})")


@needs_triton
def test_triton_configs_that_spill_are_pruned(monkeypatch):
    # What a GPU run would autotune over (the interpreter keeps one config, unpruned).
    from mas_kernels.ops.triton import abs_bmm as tk

    monkeypatch.setattr(tk._backend, "interpreting", lambda: False)
    configs = tk._configs()

    def kept(a, b, upcast, precision, accumulate=True):
        args = dict(zip(["a_ptr", "b_ptr"], [a, b]))
        args.update(stride_as=a.stride(0), stride_at=a.stride(1), stride_aj=a.stride(2),
                    stride_bs=b.stride(0), stride_bt=b.stride(1), stride_bi=b.stride(2))
        return {(c.kwargs["BLOCK_J"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"])
                for c in tk._prune(configs, args, UPCAST=upcast, PRECISION=precision, ACCUMULATE=accumulate)}

    everything = {(c.kwargs["BLOCK_J"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"]) for c in configs}
    aligned = torch.zeros(2, 32, 64, dtype=BF16)
    assert kept(aligned, aligned, False, "ieee") == everything
    fma = kept(aligned.float(), aligned.float(), True, "ieee")
    assert fma and all(j * t <= 64 * 32 for j, _, t in fma)
    odd = torch.zeros(2, 7, 13, dtype=BF16)  # position stride 13: element-wise loads
    assert kept(odd, aligned, False, "ieee") == {(64, 64, 16), (64, 64, 32), (64, 64, 64)}
    assert kept(odd.float(), aligned.float(), True, "ieee") == {(64, 64, 16), (64, 64, 32)}
    assert kept(aligned[:, :, 1:], aligned[:, :, 1:], False, "ieee") <= {(64, 64, 16), (64, 64, 32), (64, 64, 64)}
    # a 16-bit operand next to an fp32 one: TF32 as it comes; FMA products with both tile sides bounded
    assert kept(aligned, aligned.float(), True, "tf32") == everything
    assert kept(aligned, aligned.float(), True, "ieee") == {(64, 64, 16), (64, 64, 32), (128, 128, 16)}
    assert kept(odd, aligned.float(), True, "ieee") == {(64, 64, 16), (64, 64, 32)}
    conv = torch.zeros(2, 64, 32).transpose(1, 2)  # T-contiguous a, as the conv rule passes it
    assert kept(conv, aligned.float(), True, "ieee") == {(64, 64, 16)}
    assert kept(aligned, aligned, False, "ieee", accumulate=False) == everything - {(64, 64, 32)}  # split samples


# ------------------------------------------------- the native kernel's strategies
@pytest.fixture
def native():
    with using_backend("native"):
        yield _native.lib()  # the module itself: abs_bmm_bmm_chunk says which strategy the kernel takes


# (S, T, J, I, budget, strategy): which strategy abs_bmm_bmm_chunk says the kernel takes.
NATIVE_CASES = [
    (6, 40, 70, 90, 64 << 20, "bmm"),
    (3, 700, 20, 30, 64 << 20, "bmm"),
    (2, 9, 600, 610, 64 << 20, "tiles"),             # big products, few positions
    (9, 3, 40, 50, 64 << 20, "tiles"),               # few positions: groups of samples for the threads
    (3, 600, 20, 30, 64 << 10, "tiles"),             # one sample's bmm scratch is over the budget: positions
                                                     # span pack chunks (C carried between them)
    (40, 4, 64, 100, 64 << 10, "tiles"),             # groups limited by the budget
]


@needs_native
@pytest.mark.parametrize("S, T, J, I, budget, strategy", NATIVE_CASES)
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F16)], ids=str)
def test_native_strategies(native, S, T, J, I, budget, strategy, dtypes):
    assert (native.abs_bmm_bmm_chunk(S, T, J, I, budget) > 0) == (strategy == "bmm")
    a, b = make((S, T, J), dtypes[0]), make((S, T, I), dtypes[1], "transposed")
    check(make((J, I), fill="rand", layout="transposed"), a, b, 0.3, memory_budget=budget)


@needs_native
def test_native_bmm_chunk_fits_the_budget(native):
    for S, T, J, I, budget in [(64, 128, 64, 64, 64 << 20), (8, 512, 1024, 1024, 64 << 20),
                               (8, 512, 1024, 1024, 4 << 20), (4, 100, 100, 100, 64 << 10)]:
        n = native.abs_bmm_bmm_chunk(S, T, J, I, budget)
        assert 0 <= n <= S
        # Per thread, n samples' fp32 copies of 64 rows of a, at most all of b, and their products.
        rows = min(J, 64)
        assert torch.get_num_threads() * n * 4 * (T * (rows + I) + rows * I) <= budget
    assert native.abs_bmm_bmm_chunk(4, 300, 100, 100, 64 << 10) == 0  # not even one sample: the tiles run


@needs_native
@pytest.mark.parametrize("S, T, J, I", [(9, 3, 40, 50), (2, 9, 600, 610)])
def test_native_tiles_do_not_depend_on_the_thread_count(native, S, T, J, I):
    a, b = make((S, T, J)), make((S, T, I))
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            omega = torch.zeros(J, I)
            mk.abs_bmm_accumulate_(omega, a, b)
            outs.append(omega)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


# ------------------------------------------------------------------ bad input
def _args():
    return {"omega": torch.rand(4, 3), "a": torch.randn(5, 2, 4), "b": torch.randn(5, 2, 3), "alpha": 0.5,
            "memory_budget": None}


def _aliased(which):
    def change(args):
        base = torch.randn(200)
        args["omega"] = base[:12].view(4, 3)
        args[which] = base[6:6 + 30].view(5, 2, 3) if which == "b" else base[6:6 + 40].view(5, 2, 4)
    return change


def _set(**kw):
    return lambda args: args.update(kw)


def _grad_omega(args):
    args["omega"] = torch.rand(4, 3, requires_grad=True) * 1


BAD_CASES = {
    # case: (change to the good arguments, the name the message must contain)
    "omega 1-D": (_set(omega=torch.rand(12)), "omega"),
    "omega 3-D": (_set(omega=torch.rand(1, 4, 3)), "omega"),
    "omega shape": (_set(omega=torch.rand(4, 4)), "omega"),
    "omega transposed shape": (_set(omega=torch.rand(3, 4)), "omega"),
    "a 2-D": (_set(a=torch.randn(5, 4)), "a"),
    "b 4-D": (_set(b=torch.randn(5, 2, 3, 1)), "b"),
    "b samples": (_set(b=torch.randn(6, 2, 3)), "b"),
    "b positions": (_set(b=torch.randn(5, 3, 3)), "b"),
    "omega fp16": (_set(omega=torch.rand(4, 3, dtype=F16)), "omega"),
    "omega bf16": (_set(omega=torch.rand(4, 3, dtype=BF16)), "omega"),
    "omega complex": (_set(omega=torch.rand(4, 3, dtype=C64)), "omega"),
    "a complex": (_set(a=torch.randn(5, 2, 4, dtype=C64)), "a"),
    "a int": (_set(a=torch.ones(5, 2, 4, dtype=torch.int32)), "a"),
    "b bool": (_set(b=torch.ones(5, 2, 3, dtype=torch.bool)), "b"),
    "a device": (_set(a=torch.randn(5, 2, 4, device=META)), "a"),
    "b device": (_set(b=torch.randn(5, 2, 3, device=META)), "b"),
    "omega device": (_set(omega=torch.rand(4, 3, device=META)), "omega"),
    "a list": (_set(a=[[[1.0] * 4] * 2] * 5), "a"),
    "omega None": (_set(omega=None), "omega"),
    "omega requires grad": (_grad_omega, "omega"),
    "omega aliases a": (_aliased("a"), "a"),
    "omega aliases b": (_aliased("b"), "b"),
    "omega is a": (lambda args: args.update(a=args["omega"].view(1, 3, 4), b=torch.randn(1, 3, 3)), "a"),
    "omega expanded": (_set(omega=torch.rand(1, 3).expand(4, 3)), "omega"),
    "omega stride 0": (_set(omega=torch.rand(4, 1).expand(4, 3)), "omega"),
    "alpha str": (_set(alpha="x"), "alpha"),
    "alpha vector": (_set(alpha=torch.ones(2)), "alpha"),
    "budget float": (_set(memory_budget=1.5e6), "memory_budget"),
    "budget bool": (_set(memory_budget=True), "memory_budget"),
    "budget small": (_set(memory_budget=1024), "memory_budget"),
    "budget negative": (_set(memory_budget=-1), "memory_budget"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(backend, case):
    change, name = BAD_CASES[case]
    args = _args()
    change(args)
    omega = args["omega"]
    before = omega.detach().clone() if isinstance(omega, torch.Tensor) and omega.device != META else None
    # Whatever omega aliases is also unchanged: snapshot the inputs too.
    inputs = {k: args[k].detach().clone() for k in ("a", "b") if isinstance(args[k], torch.Tensor)
              and args[k].device != META}
    with pytest.raises(ValueError) as exc:
        mk.abs_bmm_accumulate_(args["omega"], args["a"], args["b"], args["alpha"], memory_budget=args["memory_budget"])
    msg = str(exc.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\[])", msg), f"{name!r} not named in: {msg}"
    if before is not None:
        assert torch.equal(omega.detach(), before), "omega was written by a call that failed"
    for k, v in inputs.items():
        assert torch.equal(args[k], v), f"{k} was written by a call that failed"


def test_omega_requiring_grad_is_fine_under_no_grad(backend):
    leaf = torch.zeros(3, 5, requires_grad=True)
    with torch.no_grad():
        omega = leaf * 1
        mk.abs_bmm_accumulate_(omega, torch.ones(2, 4, 3), -torch.ones(2, 4, 5))
    assert torch.equal(omega, torch.full((3, 5), 8.0))


# ------------------------------------------------------- a torch.library op
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, BF16)], ids=str)
def test_opcheck(backend, dtypes):
    a = torch.randn(3, 6, 4, dtype=dtypes[0])
    b = torch.randn(3, 5, 6, dtype=dtypes[1]).transpose(1, 2)  # a strided view
    results = torch.library.opcheck(OPS.abs_bmm_accumulate_.default, (torch.rand(4, 5), a, b, 0.5, 1 << 20))
    assert results and all(v == "SUCCESS" for v in results.values()), results


def test_bumps_version_and_records_no_graph(backend):
    omega = torch.rand(3, 5)
    a = torch.randn(4, 2, 3, requires_grad=True)
    before = omega._version
    OPS.abs_bmm_accumulate_(omega, a, torch.randn(4, 2, 5), 0.5, 1 << 20)
    assert omega._version > before
    assert omega.grad_fn is None and not omega.requires_grad


def test_inference_tensors(backend):
    with torch.inference_mode():
        omega = torch.zeros(3, 4)
        mk.abs_bmm_accumulate_(omega, torch.ones(2, 3, 3), -torch.ones(2, 3, 4))
    assert torch.equal(omega, torch.full((3, 4), 6.0))


def test_compiles_into_one_graph(backend):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(omega, a, b):
        mk.abs_bmm_accumulate_(omega, a * 2, b, 0.5)
        return omega

    a, b = make((3, 4, 6)), make((3, 4, 5))
    omega, eager = torch.zeros(6, 5), torch.zeros(6, 5)
    torch._dynamo.reset()
    torch.compile(step, backend=record, fullgraph=True)(omega, a, b)
    step(eager, a, b)
    assert torch.equal(omega, eager)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("mas_kernels.abs_bmm_accumulate_" in t for t in targets), targets
