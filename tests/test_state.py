"""``FlatBuffers``: the flat stores behind Omega, theta* and the accumulators."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mas_kernels.state import FlatBuffers

SPECIAL = [0.0, 1.0, -2.5, 3e38, -3e38, float("inf"), float("-inf"), float("nan"), 1e-45]


def _store(dtypes):
    specs = [(f"p{i}", torch.Size([5, 3]) if i % 2 else torch.Size([7]), "cpu", d) for i, d in enumerate(dtypes)]
    return FlatBuffers(specs)


@settings(max_examples=60, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), min_size=1, max_size=4),
    values=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL)), max_size=8),
)
def test_all_finite_matches_isfinite_everywhere(dtypes, values):
    store = _store(dtypes)
    for b in store.buffers.values():
        b.uniform_(0, 1)
    buffers = list(store.buffers.values())
    for pos, v in values:
        b = buffers[pos % len(buffers)]
        b[pos % b.numel()] = v  # huge values become inf in the 16-bit buffers, as they would there
    want = all(bool(torch.isfinite(b).all()) for b in buffers)
    assert store.all_finite() == want


def test_finite_values_whose_float32_sum_overflows_are_finite():
    store = _store([torch.float32])
    (b,) = store.buffers.values()
    b.fill_(3e38)  # every element finite; their float32 sum is inf
    assert not torch.isfinite(b.sum())
    assert store.all_finite()
    b[4] = float("nan")
    assert not store.all_finite()
    assert store.first_non_finite() == "p0"
