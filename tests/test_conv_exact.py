"""The exact rule's convolution weight numerator ``sum_k |g_k|`` (rules/conv_exact.py), every strategy forced in
turn, against the one-sample-at-a-time float64 oracle, over strides, dilations, groups, padding modes and odd
sizes; the scratch of each strategy within the budget; the crossover table's choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bench.harness import peak_memory
from mas_kernels import _backend
from mas_kernels.estimators.rules import conv_exact
from tests import reference as ref
from tests.helpers import HYPOTHESIS, assert_close, using_backend

STRATEGIES = [s for s in conv_exact.STRATEGIES if s != "native" or _backend.native_available()]
CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def convs(draw):
    nd = draw(st.sampled_from([1, 2, 3] if draw(st.integers(0, 3)) == 0 else [2]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    same = all(s == 1 for s in stride) and draw(st.booleans())
    pad = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(nd))
    # sizes: odd and small, large enough for the kernel and for reflect padding
    size = tuple(max(draw(st.integers(3, 9)), (kk - 1) * d + 1, 3) for kk, d in zip(k, dilation))
    conv = CLS[nd](cin, cout, k, stride, pad, dilation, groups, bias=False, padding_mode=mode)
    n = draw(st.integers(1, 4))
    return conv, (n, cin, *size)


@settings(max_examples=40, **HYPOTHESIS)
@given(spec=convs(), small=st.booleans())
def test_every_strategy_matches_the_oracle(spec, small):
    conv, shape = spec
    x = torch.randn(shape)
    with torch.no_grad():
        delta = torch.randn_like(conv(x))
    expected = ref.conv_weight_abs_sum(conv, x, delta)
    budget = (64 << 10) if small else (256 << 20)
    for strategy in STRATEGIES:
        omega = torch.full_like(conv.weight, 0.5)  # accumulates: += onto what was there
        conv_exact.conv_weight_abs_sum_(omega, x, delta, conv, budget, strategy)
        assert_close(omega - 0.5, expected, atol=1e-5, rtol=1e-4, name=f"{strategy} {conv}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_accumulates_into_a_channels_last_omega(strategy):
    """omega in another memory format (the numerators of a channels-last weight, e.g. the self-check's):
    accumulated in place as into a contiguous one (the unfold strategy viewed it: a RuntimeError before)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        delta = torch.randn_like(conv(x))
    omega = torch.full_like(conv.weight, 0.5).contiguous(memory_format=torch.channels_last)
    assert not omega.is_contiguous()
    conv_exact.conv_weight_abs_sum_(omega, x, delta, conv, 256 << 20, strategy)
    assert_close(omega - 0.5, ref.conv_weight_abs_sum(conv, x, delta), atol=1e-5, rtol=1e-4, name=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_accumulate_in_float32(strategy, dtype):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(3, 4, 7, 7).to(dtype)
    delta = torch.randn(3, 6, 7, 7).to(dtype)
    expected = ref.conv_weight_abs_sum(conv, x, delta)
    omega = torch.zeros_like(conv.weight)
    conv_exact.conv_weight_abs_sum_(omega, x, delta, conv, 1 << 20, strategy)
    assert_close(omega, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scratch_stays_within_the_budget(strategy):
    """Peak memory of one call (profiler allocation events) at most the budget plus the fp32 input copies."""
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(16, 8, 16, 16)
    with torch.no_grad():
        delta = torch.randn_like(conv(x))
    budget = 256 << 10
    # unfolded patches of the batch alone: 16 * 256 * 72 floats = 1.2 MB, well over the budget
    assert 4 * 16 * 256 * 72 > 4 * budget
    omega = torch.zeros_like(conv.weight)
    peak = peak_memory(lambda: conv_exact.conv_weight_abs_sum_(omega, x, delta, conv, budget, strategy))
    padded = 4 * 16 * 8 * 18 * 18  # the padded input (unfold, grouped)
    assert peak <= budget + padded, (strategy, peak)
    assert_close(omega, ref.conv_weight_abs_sum(conv, x, delta), atol=1e-5, rtol=1e-4)


def test_the_table_picks_a_strategy_per_shape(monkeypatch):
    x = torch.randn(2, 4, 8, 8)
    d = torch.randn(2, 4, 8, 8)
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert conv_exact.choose(depthwise, x, d) == "grouped"
    small = torch.randn(2, 4, 4, 4)
    assert conv_exact.choose(nn.Conv2d(4, 4, 3, padding=1), small, small) == "unfold"
    expected = "native" if _backend.choose(torch.device("cpu")) == "native" else "unfold"
    assert conv_exact.choose(nn.Conv2d(4, 4, 3, padding=1), x, d) == expected
    # a budget too small for the native kernel's accumulator and product: unfold (abs_bmm tiles its output)
    big = nn.Conv2d(256, 256, 3, padding=1)
    assert conv_exact.choose(big, torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8), budget=1 << 20) == "unfold"
    with pytest.raises(ValueError, match="strategy must be one of"):
        conv_exact.conv_weight_abs_sum_(torch.zeros_like(big.weight), x, d, big, 1 << 20, "im2col")


@pytest.mark.skipif("native" not in STRATEGIES, reason="the native extension is not built")
def test_the_choice_kept_per_layer_follows_the_shape_budget_and_backend(monkeypatch):
    """conv_weight_abs_sum_ keeps each layer's choice per input shape: the one choose() makes, made again for
    another shape, budget or backend (a spy on the strategies), and the numbers the oracle's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    ran = []
    for name in ("native", "unfold"):
        monkeypatch.setitem(conv_exact._RUN, name, lambda *a, name=name, real=conv_exact._RUN[name]: (
            ran.append(name), real(*a))[1])

    def once(x, budget=256 << 20):
        d = torch.randn(x.shape[0], 4, *x.shape[2:])
        omega = conv_exact.conv_weight_abs_sum_(torch.zeros_like(conv.weight), x, d, conv, budget)
        assert_close(omega, ref.conv_weight_abs_sum(conv, x, d), atol=1e-5, rtol=1e-4)
        return ran.pop()

    x, small = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    assert [once(x), once(x), once(small), once(x)] == ["native", "native", "unfold", "native"]
    assert once(torch.randn(1, 4, 8, 8), budget=1 << 10) == "unfold"  # the native kernel's scratch does not fit
    with using_backend("torch"):
        assert once(x) == "unfold"
    assert once(x) == "native"


@pytest.mark.skipif("native" not in STRATEGIES, reason="the native extension is not built")
def test_native_refuses_a_budget_below_one_samples_product():
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 8, 8)
    with pytest.raises(RuntimeError, match="memory_budget"):
        conv_exact.conv_weight_abs_sum_(torch.zeros_like(conv.weight), x, torch.randn(2, 64, 8, 8), conv, 64 << 10,
                                        "native")


# The native kernel's shifted-rows layout (csrc/conv_exact.cpp: the padded input cut into stride phases, a patch
# row one contiguous slice per output plane) serves rows wide enough that widening them by the kernel's reach
# costs at most half again; narrower rows, and budgets too small for a whole sample, take the per-run gather.
SHIFTED = [
    (nn.Conv2d, dict(kernel_size=3, padding=1), (3, 4, 20, 20)),
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1), (3, 4, 21, 20)),
    (nn.Conv2d, dict(kernel_size=(3, 2), stride=(3, 2), padding=(2, 0), dilation=(1, 2)), (2, 4, 19, 23)),
    (nn.Conv2d, dict(kernel_size=1, stride=2), (3, 4, 16, 16)),
    (nn.Conv2d, dict(kernel_size=3, dilation=2, padding=2, groups=2), (2, 4, 18, 18)),
    (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="circular"), (2, 4, 17, 17)),
    (nn.Conv1d, dict(kernel_size=5, stride=2, padding=2, dilation=2), (3, 4, 40)),
    (nn.Conv3d, dict(kernel_size=3, stride=(2, 1, 2), padding=1), (2, 3, 5, 7, 20)),
]


@pytest.mark.skipif("native" not in STRATEGIES, reason="the native extension is not built")
@pytest.mark.parametrize("cls, kw, shape", SHIFTED)
@pytest.mark.parametrize("budget", [64 << 10, 256 << 20])
def test_native_layouts_match_the_oracle(cls, kw, shape, budget):
    conv = cls(shape[1], 6, bias=False, **kw)
    x = torch.randn(shape)
    with torch.no_grad():
        delta = torch.randn_like(conv(x))
    omega = torch.zeros_like(conv.weight)
    conv_exact.conv_weight_abs_sum_(omega, x, delta, conv, budget, "native")
    assert_close(omega, ref.conv_weight_abs_sum(conv, x, delta), atol=1e-5, rtol=1e-4, name=f"{conv} {budget}")


@pytest.mark.skipif("native" not in STRATEGIES, reason="the native extension is not built")
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("stride", [1, 2])
def test_native_non_finite_inputs_as_the_definition(value, stride):
    """A sample with an inf or NaN goes through the gather (the shifted rows would multiply the values
    wrapped into a widened row, by zero: NaN): its inf/NaN reach exactly the weights whose patches see it."""
    conv = nn.Conv2d(4, 5, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(4, 4, 20, 20)
    x[1, 2, 5, 19] = value  # the last column: read by the wrapped positions of the next row
    with torch.no_grad():
        delta = torch.randn_like(conv(x.nan_to_num()))
    native = torch.zeros_like(conv.weight)
    conv_exact.conv_weight_abs_sum_(native, x, delta, conv, 256 << 20, "native")
    unfold = torch.zeros_like(conv.weight)
    conv_exact.conv_weight_abs_sum_(unfold, x, delta, conv, 256 << 20, "unfold")
    assert torch.equal(native.isnan(), unfold.isnan()) and torch.equal(native.isinf(), unfold.isinf())
    fin = native.isfinite()
    assert not fin.all()
    assert_close(native[fin], unfold[fin], atol=1e-5, rtol=1e-4)
