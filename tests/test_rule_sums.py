"""The exact rule's fused small sums (csrc/rule_sums.cpp: a bias's, an embedding's rows, a LayerNorm's, each
summed per sample, then its abs summed over samples in the same call) against float64 definitions, over shapes,
dtypes and strides; and the rules that use them against their PyTorch path and the one-sample oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import mas_kernels as mk
from mas_kernels import _backend, _native
from mas_kernels.estimators.rules import base, embedding, linear, norm
from tests import models
from tests import reference as ref
from tests.helpers import HYPOTHESIS
from tests.test_exact_layers import close

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="the native extension is not built")
F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}  # on the inputs as rounded to the dtype


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` (S, T, D) as the rules may see it: contiguous, samples not first in memory, or one row expanded."""
    if how == "permuted":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "expanded":
        return t[:1].expand_as(t)
    return t


@settings(max_examples=40, **HYPOTHESIS)
@given(s=st.integers(0, 5), t=st.integers(1, 7), d=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       how=st.sampled_from(["contiguous", "permuted", "expanded"]))
def test_abs_position_sums(s, t, d, dtype, how):
    delta = _layout(torch.randn(s, t, d).to(dtype), how)
    acc = torch.rand(d)
    want = acc.double() + delta.to(F64).sum(1).abs().sum(0)
    _native.lib().abs_position_sums_(acc, delta)
    torch.testing.assert_close(acc.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@settings(max_examples=40, **HYPOTHESIS)
@given(s=st.integers(0, 5), t=st.integers(1, 9), d=st.integers(1, 40), v=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES), how=st.sampled_from(["contiguous", "permuted", "expanded"]),
       pad=st.sampled_from([None, 0, 2]), int32=st.booleans(), shared_ids=st.booleans())
def test_embedding_abs_rows(s, t, d, v, dtype, how, pad, int32, shared_ids):
    delta = _layout(torch.randn(s, t, d).to(dtype), how)
    ids = torch.randint(0, v, (1, t)).expand(s, t) if shared_ids else torch.randint(0, v, (s, t))
    ids = ids.int() if int32 else ids
    pad = pad if pad is not None and pad < v else None
    acc = torch.rand(v, d)
    want = acc.double().clone()
    for k in range(s):  # the definition: sample k's gradient rows (padding gets none), then their abs
        keep = ids[k] != pad if pad is not None else torch.ones(t, dtype=torch.bool)
        want += torch.zeros(v, d, dtype=F64).index_add_(0, ids[k][keep].long(), delta[k][keep].to(F64)).abs()
    _native.lib().embedding_abs_rows_(acc, ids, delta, -1 if pad is None else pad)
    torch.testing.assert_close(acc.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_embedding_abs_rows_refuses_an_id_out_of_range():
    acc = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        _native.lib().embedding_abs_rows_(acc, torch.tensor([[1, 4]]), torch.randn(1, 2, 3), -1)
    assert acc.abs().sum() == 0


@settings(max_examples=30, **HYPOTHESIS)
@given(s=st.integers(1, 5), t=st.integers(1, 7), d=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       rms=st.booleans(), which=st.sampled_from(["both", "weight", "bias"]))
def test_layer_norm_abs_sums(s, t, d, dtype, rms, which):
    x, delta = (3 * torch.randn(s, t, d) + 1).to(dtype), torch.randn(s, t, d).to(dtype)
    acc_w, acc_b = torch.rand(d), torch.rand(d)
    dd = delta.to(F64)
    x_hat = ref.last_dim_x_hat(x, 1e-5, rms)
    want_w = acc_w.double() + ((dd * x_hat).sum(1).abs().sum(0) if which != "bias" else 0)
    want_b = acc_b.double() + (dd.sum(1).abs().sum(0) if which != "weight" else 0)
    _native.lib().layer_norm_abs_sums_(acc_w if which != "bias" else None, acc_b if which != "weight" else None,
                                       x, delta, 1e-5, rms)
    tol = 1e-4 if dtype == torch.float32 else 1e-3  # x_hat of a whole row in float32
    torch.testing.assert_close(acc_w.double(), want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(acc_b.double(), want_b, rtol=tol, atol=tol)


@settings(max_examples=30, **HYPOTHESIS)
@given(layers=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(1, 24), st.integers(1, 24),
                                 st.sampled_from(["both", "weight", "bias"]),
                                 st.sampled_from(["contiguous", "permuted", "expanded"])), min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), transposed=st.booleans())
def test_linear_abs_sums(layers, dtype, transposed):
    """Several Linears (Conv1Ds) in one call, against the definition in float64 per layer: ``sum_s |d_s^T x_s|``
    (Conv1D's (I, J) weight: ``|x_s^T d_s|``) and ``sum_s |sum_t d_s[t]|``; either accumulator absent."""
    accs_w, accs_b, deltas, xs, want = [], [], [], [], []
    for s, t, j, i, which, how in layers:
        d = _layout(torch.randn(s, t, j).to(dtype), how)
        x = _layout(torch.randn(s, t, i).to(dtype), "permuted" if how == "expanded" else "contiguous")
        w = torch.rand(i, j) if transposed else torch.rand(j, i)
        b = torch.rand(j)
        prod = torch.einsum("stj,sti->sji", d.to(F64), x.to(F64)).abs().sum(0)  # sum_s |d_s^T x_s|
        want.append((w.double() + (prod.T if transposed else prod), b.double() + d.to(F64).sum(1).abs().sum(0)))
        accs_w.append(w if which != "bias" else None)
        accs_b.append(b if which != "weight" else None)
        deltas.append(d)
        xs.append(x)
    _native.lib().linear_abs_sums_(accs_w, accs_b, deltas, xs, transposed, 1 << 20)
    tol = 10 * TOL[dtype]  # a sum over positions and samples of products
    for (w, b), (want_w, want_b) in zip(zip(accs_w, accs_b), want):
        if w is not None:
            torch.testing.assert_close(w.double(), want_w, rtol=tol, atol=tol)
        if b is not None:
            torch.testing.assert_close(b.double(), want_b, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["layer_norm", "channel"])
def test_norm_sums_write_nothing_when_an_accumulator_is_refused(op):
    """The weight's numerators are not written when the bias's accumulator is refused (checked first)."""
    x, d = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    acc_w, bad_b = torch.zeros(4 if op == "layer_norm" else 3), torch.zeros(7)
    with pytest.raises(RuntimeError, match="an accumulator has 7 elements"):
        if op == "layer_norm":
            _native.lib().layer_norm_abs_sums_(acc_w, bad_b, x, d, 1e-5, False)
        else:
            _native.lib().channel_abs_sums_(acc_w, bad_b, x, d, torch.zeros(3), torch.ones(3), 1e-5)
    assert acc_w.abs().sum() == 0


def test_linear_abs_sums_refuses_mismatched_lists():
    with pytest.raises(RuntimeError, match="one acc_w, acc_b, delta and x per layer"):
        _native.lib().linear_abs_sums_([None], [None, None], [torch.randn(1, 2, 3)], [torch.randn(1, 2, 4)], False, 1 << 20)


def test_linears_in_one_native_call_match_their_per_layer_path_and_the_oracle(monkeypatch):
    """The exact rule serves every Linear of a batch in one ``linear_abs_sums_`` call (a spy), equal to the
    one-sample oracle and to the same layers one by one."""
    torch.manual_seed(0)
    model = models.randomize_norms(Tokens()).eval()
    ids = torch.randint(0, 11, (5, 6))
    lib, used = _native.lib(), []

    class Spy:
        def __getattr__(self, name):
            got = getattr(lib, name)
            if name != "linear_abs_sums_":
                return got

            def call(accs_w, *rest):
                used.append(len(accs_w))
                return got(accs_w, *rest)
            return call

    real = base.native_lib
    monkeypatch.setattr(linear, "native_lib", lambda ctx: Spy() if real(ctx) is not None else None)
    together = mk.MAS(model, importance="global", verify=False).estimate([ids[:2], ids[2:]]).consolidate().omega
    assert used == [2, 2], used  # the two nn.Linears of each batch in one call (the Conv1D has a rule of its own)
    close(together, ref.global_exact(model, [ids]))
    monkeypatch.setattr(linear.LinearRule, "exact_many", base.Rule.exact_many)
    apart = mk.MAS(model, importance="global", verify=False).estimate([ids[:2], ids[2:]]).consolidate().omega
    for k, v in apart.items():
        torch.testing.assert_close(together[k], v, rtol=1e-6, atol=0, msg=k)


@settings(max_examples=30, **HYPOTHESIS)
@given(s=st.integers(1, 5), c=st.integers(1, 20), l=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       which=st.sampled_from(["both", "weight", "bias"]), channels_last=st.booleans())
def test_channel_abs_sums(s, c, l, dtype, which, channels_last):
    """A BatchNorm's with running statistics, against the definition in float64: per sample and channel
    ``g_w = sum_l d (x - mean) / sqrt(var + eps)``, ``g_b = sum_l d``, their abs summed over the samples; x and
    d (N, C, L), or (N, C, 1, L) in channels-last memory (a CNN's layout: copied to rows in the call)."""
    x, delta = (3 * torch.randn(s, c, l) + 1).to(dtype), torch.randn(s, c, l).to(dtype)
    mean, var = torch.randn(c), torch.rand(c) + 0.1
    given_x, given_d = x, delta
    if channels_last:
        given_x, given_d = (t.unsqueeze(2).contiguous(memory_format=torch.channels_last) for t in (x, delta))
    acc_w, acc_b = torch.rand(c), torch.rand(c)
    dd, xd = delta.to(F64), x.to(F64)
    g_w = (dd * (xd - mean.double()[:, None])).sum(2) / (var.double() + 1e-5).sqrt()
    want_w = acc_w.double() + (g_w.abs().sum(0) if which != "bias" else 0)
    want_b = acc_b.double() + (dd.sum(2).abs().sum(0) if which != "weight" else 0)
    _native.lib().channel_abs_sums_(acc_w if which != "bias" else None, acc_b if which != "weight" else None,
                                    given_x, given_d, mean, var, 1e-5)
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(acc_w.double(), want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(acc_b.double(), want_b, rtol=tol, atol=tol)


def test_batchnorm_with_the_fused_sums_matches_its_pytorch_path_and_the_oracle(monkeypatch):
    """The BatchNorm rule takes ``channel_abs_sums_`` (a spy on the op), equals the one-sample oracle, and the
    per-sample tensors of its PyTorch path."""
    torch.manual_seed(0)
    model = models.randomize_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3),
        nn.Flatten(), nn.BatchNorm1d(2 * 4 * 4, affine=True))).eval()
    x = torch.randn(5, 3, 6, 6)
    lib, used = _native.lib(), []

    class Spy:
        def __getattr__(self, name):
            if name == "channel_abs_sums_":
                used.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(norm, "native_lib", lambda ctx, real=base.native_lib: Spy() if real(ctx) is not None else None)
    fused = mk.MAS(model, importance="global", verify=False).estimate([x[:2], x[2:]]).consolidate().omega
    assert len(used) >= 4, used  # two layers, two batches (hasattr and the call each)
    close(fused, ref.global_exact(model, [x]))
    monkeypatch.setattr(norm, "native_lib", lambda *a: None)
    plain = mk.MAS(model, importance="global", verify=False).estimate([x[:2], x[2:]]).consolidate().omega
    for k, v in plain.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-5, atol=1e-7, msg=k)


class Tokens(nn.Module):
    """Token and position embeddings (the position ids one row shared by every sample, as BERT's and GPT-2's),
    LayerNorm and RMSNorm, Linears on sequences with and without bias, a GPT-2 Conv1D."""

    def __init__(self, vocab: int = 11, dim: int = 8, pad: int | None = 0):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=pad)
        self.pos = nn.Embedding(7, dim)
        self.ln = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.rms = nn.RMSNorm(2 * dim)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.conv1d = Conv1D(3, dim)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        h = self.down(torch.tanh(self.rms(self.up(self.ln(h)))))
        return self.conv1d(h)


@pytest.mark.parametrize("pad", [None, 0])
def test_rules_with_the_fused_sums_match_their_pytorch_path_and_the_oracle(pad, monkeypatch):
    torch.manual_seed(0)
    model = models.randomize_norms(Tokens(pad=pad)).eval()
    ids = torch.randint(0, 11, (5, 6))
    ids[0, :3] = 3  # a repeated id in one sample
    batches = [ids[:2], ids[2:]]
    calls = []
    real = base.native_sums

    def spy(ctx, accs, ts):
        got = real(ctx, accs, ts)
        calls.append(got is not None)
        return got

    for mod in (linear, embedding, norm):
        monkeypatch.setattr(mod, "native_sums", spy)
    fused = mk.MAS(model, importance="global", verify=False).estimate(batches).consolidate().omega
    assert calls and all(calls), calls
    close(fused, ref.global_exact(model, [torch.cat(batches)]))
    for mod in (linear, embedding, norm):
        monkeypatch.setattr(mod, "native_sums", lambda *a: None)
    plain = mk.MAS(model, importance="global", verify=False).estimate(batches).consolidate().omega
    for k, v in plain.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-5, atol=1e-7, msg=k)
