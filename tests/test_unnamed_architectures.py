"""Architectures no other test names, each run through the DEFAULT wrapper (``mk.MAS(model, importance="global")``,
default self-check) and compared with the one-sample-at-a-time oracle of ``tests/reference.py``, or refused by
name; ``"global_batch"`` against its oracle and ``"local"`` for its sample count. Sizes collide on purpose
(N == T, N == C) and do not.

The last section holds the defects this trial found, each the reported repro, against the oracle: a layer used
twice per batch with the rows of one use reordered (a batch sorted by length), rows the data chose (token-choice
experts, unpadded tokens) over later batches whose row counts match the first one's, random routing over several
batches, ``out.view(T * N, H)`` after a sequence-first RNN, a batch sorted and unsorted around a layer used once.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from hypothesis import given, settings
from hypothesis import strategies as st

import mas_kernels as mk
from mas_kernels.estimators import VerificationError
from tests import reference as ref
from tests.test_exact_by_construction import batch_args, local_count
from tests.test_exact_layers import close, no_missing


def default_exact(model, batches, dims, output_fn=lambda o: o, **kw):
    """The default wrapper (default ``verify``) on batches of positional arguments vs the oracle."""
    mas = mk.MAS(model, importance="global", output_fn=output_fn, forward=lambda m, b: m(*b), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # per-sample fallbacks, torch.func's batching rules
        warnings.simplefilter("ignore", UserWarning)
        mas.estimate(batches).consolidate()
    expected = ref.global_exact_args(model, batches, dims, output_fn)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
    assert mas.samples_consolidated == sum(ref._size(b, dims) for b in batches)
    return mas


def all_rules(model, batches, dims, output_fn=lambda o: o, local=True):
    """``global`` (default wrapper) and ``global_batch`` against their oracles; ``local`` runs and counts N."""
    model.eval()
    default_exact(model, batches, dims, output_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        batch_args(model, batches, dims, output_fn)
        if local:
            local_count(model, batches, sum(ref._size(b, dims) for b in batches))


def randomize_norm(norm):
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)
    return norm


# ---------------------------------------------------------------- token-choice mixture of experts
class Top1MoE(nn.Module):
    """Token-choice top-1 routing: each token's argmax expert, ``expert(h[mask])`` scattered back (independent)."""

    def __init__(self, d=4, experts=3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # (N, T, D) or (N, D)
        h = torch.tanh(self.inp(x))
        tok = h.reshape(-1, h.shape[-1])
        w, idx = self.router(tok).softmax(-1).max(-1)
        out = torch.zeros_like(tok)
        for e, expert in enumerate(self.experts):
            mask = idx == e
            if mask.any():
                out[mask] = expert(tok[mask]) * w[mask, None]
        return self.head(out.reshape(h.shape))


class Top2MoE(nn.Module):
    """Token-choice top-2, the two gates renormalized, ``index_add`` back (independent)."""

    def __init__(self, d=4, experts=3):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x):
        n, t, d = x.shape
        tok = x.reshape(n * t, d)
        w, idx = self.router(tok).topk(2, -1)
        w = w.softmax(-1)
        out = torch.zeros_like(tok)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, expert(tok[rows]) * w[rows, slot, None])
        return out.view(n, t, d)


class Top1Capacity(nn.Module):
    """Top-1 with an expert capacity over the whole batch (tokens past it dropped): samples coupled."""

    def __init__(self, d=4, experts=2, capacity=3):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.capacity = capacity

    def forward(self, x):
        n, t, d = x.shape
        tok = x.reshape(n * t, d)
        w, idx = self.router(tok).softmax(-1).max(-1)
        out = tok.clone()
        for e, expert in enumerate(self.experts):
            sel = (idx == e).nonzero().flatten()[:self.capacity]
            out = out.index_add(0, sel, expert(tok[sel]) * w[sel, None])
        return out.view(n, t, d)


@pytest.mark.parametrize("n, t", [(3, 4), (4, 4), (5, 2)], ids=["N!=T", "N==T==D", "N>T"])
def test_token_choice_top1_moe(n, t):
    """Seed 6: the routing makes no expert's rows look like the batch's samples. Other seeds hit the reported
    defects (a silently wrong expert weight, ``LayoutChanged``, a shape mismatch in the model's own scatter)."""
    torch.manual_seed(6)
    all_rules(Top1MoE(), [(torch.randn(n, t, 4),), (torch.randn(2, t, 4),)], [0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_token_choice_top1_moe_one_token_per_sample(n):
    torch.manual_seed(6)
    all_rules(Top1MoE(), [(torch.randn(n, 4),)], [0])


def test_token_choice_top2_moe():
    torch.manual_seed(6)
    all_rules(Top2MoE(), [(torch.randn(3, 4, 4),)], [0])


def test_top1_moe_with_a_batch_capacity_is_refused_by_name():
    torch.manual_seed(13)
    model = Top1Capacity().eval()
    x = torch.randn(4, 4, 4)
    with pytest.warns(RuntimeWarning, match="not independent"):
        with pytest.raises(ValueError, match="not independent.*global_batch"):
            mk.MAS(model, importance="global").estimate([x])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batch_args(model, [(x,)], [0])
        local_count(model, [(x,)], 4)


# ---------------------------------------------------------------- EmbeddingBag
class Bag(nn.Module):
    def __init__(self, mode="mean", padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, ids, *rest):
        return self.head(torch.tanh(self.bag(ids, *rest)))


class BagWeighted(Bag):
    def forward(self, ids, weights):
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=weights)))


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
@pytest.mark.parametrize("n, t", [(3, 4), (4, 4)], ids=["N!=T", "N==T==D"])
def test_embedding_bag_2d(mode, n, t):
    all_rules(Bag(mode), [(torch.randint(0, 10, (n, t)),)], [0])


def test_embedding_bag_padding_idx_and_per_sample_weights():
    ids = torch.randint(0, 10, (4, 4))
    ids[0, :2] = 0
    all_rules(Bag(padding_idx=0), [(ids,)], [0])
    all_rules(BagWeighted("sum"), [(torch.randint(0, 10, (3, 4)), torch.rand(3, 4))], [0, 0])


def test_embedding_bag_offsets_is_refused_by_name_by_the_exact_rule():
    """1-D flat ids + offsets: the samples (bags) are in no dim of the first argument."""
    model = Bag("sum").eval()
    flat, offsets = torch.randint(0, 10, (7,)), torch.tensor([0, 2, 5])
    mas = mk.MAS(model, importance="global", forward=lambda m, b: m(*b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the probe's own note, before the refusal
        with pytest.raises(ValueError, match=r"did not run on a sub-batch of its samples.*EmbeddingBag.*\(N, L\).*"
                                             "global_batch") as exc:
            mas.estimate([(flat, offsets)])
    assert "eval mode" not in str(exc.value) and "sample_dim" not in str(exc.value)  # advice that does not apply
    assert mas.num_samples == 0


# ---------------------------------------------------------------- Bilinear, PReLU, GLU, InstanceNorm
class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bil = nn.Bilinear(4, 3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, z):
        return self.head(torch.tanh(self.bil(torch.tanh(self.a(x)), z)))


class PReLUNet(nn.Module):
    def __init__(self, channels, conv):
        super().__init__()
        self.conv = conv
        self.a = nn.Conv1d(3, 4, 3, padding=1) if conv else nn.Linear(4, 4)
        self.act = nn.PReLU(channels, init=0.3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.head(h.mean(-1) if self.conv else h)


class InstanceNormNet(nn.Module):
    """(N, C, T) through a bias-free Conv1d (InstanceNorm cancels a conv bias: importance exactly 0)."""

    def __init__(self, track):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1, bias=False)
        self.norm = randomize_norm(nn.InstanceNorm1d(4, affine=True, track_running_stats=track))
        if track:
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).transpose(1, 2))


@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_bilinear(n):
    all_rules(BilinearNet(), [(torch.randn(n, 4), torch.randn(n, 3))], [0, 0])
    all_rules(BilinearNet(), [(torch.randn(n, 3, 4), torch.randn(n, 3, 3))], [0, 0])


@pytest.mark.parametrize("channels, conv", [(1, False), (4, False), (1, True), (4, True)],
                         ids=["shared", "per-feature", "shared-conv", "per-channel-conv"])
@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C"])
def test_prelu(channels, conv, n):
    x = torch.randn(n, 3, 4) if conv else torch.randn(n, 4)
    all_rules(PReLUNet(channels, conv), [(x,)], [0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_glu(n):
    all_rules(nn.Sequential(nn.Linear(4, 8), nn.GLU(), nn.Linear(4, 2)), [(torch.randn(n, 4),)], [0])


@pytest.mark.parametrize("track", [False, True], ids=["instance-stats", "running-stats"])
@pytest.mark.parametrize("n, t", [(4, 4), (3, 5)], ids=["N==C==T", "N!=T"])
def test_instance_norm_1d_affine_in_eval(track, n, t):
    # local: refused today whatever uncovered= says (see the QA report), so not run here
    all_rules(InstanceNormNet(track), [(torch.randn(n, 3, t),)], [0], local=False)


# ---------------------------------------------------------------- transposed and functional convolutions
class Decoder1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 12)
        self.up1 = nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose1d(3, 2, 2, dilation=2)

    def forward(self, z):
        return self.up2(torch.tanh(self.up1(torch.tanh(self.fc(z)).view(-1, 4, 3))))


class Decoder2d(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.fc = nn.Linear(3, 16)
        self.up1 = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.up2 = nn.ConvTranspose2d(4, 2, 3, padding=1)

    def forward(self, z):
        return self.up2(torch.tanh(self.up1(torch.tanh(self.fc(z)).view(-1, 4, 2, 2))))


class FunctionalConv(nn.Module):
    """A Conv1d's weight and bias used only through ``F.conv1d`` (the module is never called)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(F.conv1d(F.pad(x, (2, 0)), self.conv.weight, self.conv.bias))
        return self.head(h.transpose(1, 2))


class CausalConvSeq(nn.Module):
    """A causal (left-padded), dilated Conv1d sequence model on (N, C, T) with a residual."""

    def __init__(self, c=4, k=3):
        super().__init__()
        self.k = k
        self.c1 = nn.Conv1d(c, c, k)
        self.c2 = nn.Conv1d(c, c, k, dilation=2)
        self.head = nn.Conv1d(c, 3, 1)

    def forward(self, x):
        h = torch.tanh(self.c1(F.pad(x, (self.k - 1, 0))))
        h = torch.tanh(self.c2(F.pad(h, (2 * (self.k - 1), 0)))) + h
        return self.head(h)


class TiedConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return F.conv_transpose1d(h, self.enc.weight, stride=2, padding=1, output_padding=1)


@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C"])
def test_conv_transpose_decoders(n):
    z = torch.randn(n, 3)
    all_rules(Decoder1d(), [(z,)], [0])
    all_rules(Decoder2d(), [(z,)], [0])
    all_rules(Decoder2d(groups=2), [(z,)], [0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C==T"])
def test_conv_weight_used_only_functionally_and_tied_transposed(n):
    x = torch.randn(n, 3, 4)
    all_rules(FunctionalConv(), [(x,)], [0])
    all_rules(TiedConvAutoencoder(), [(x,)], [0])


@pytest.mark.parametrize("n, t", [(4, 4), (3, 5), (4, 6)], ids=["N==C==T", "N!=T", "N==C!=T"])
def test_causal_conv1d_sequence_model(n, t):
    all_rules(CausalConvSeq(), [(torch.randn(n, 4, t),)], [0])


# ---------------------------------------------------------------- one module called several times
class Albert(nn.Module):
    """ALBERT-style: one TransformerEncoderLayer (batch_first) called ``loops`` times."""

    def __init__(self, loops=3, norm_first=False):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True, norm_first=norm_first)
        for m in self.layer.modules():
            if isinstance(m, nn.LayerNorm):
                randomize_norm(m)
        self.loops = loops
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        for _ in range(self.loops):
            h = self.layer(h, src_key_padding_mask=mask)
        return self.head(h)


class LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(self.fc(x)))


@pytest.mark.parametrize("n, t", [(3, 5), (4, 4), (2, 2)], ids=["N!=T", "N==T", "N==T==2"])
def test_albert_style_shared_encoder_layer(n, t):
    all_rules(Albert(), [(torch.randint(0, 11, (n, t)),)], [0])


def test_albert_style_norm_first_and_a_key_padding_mask():
    ids = torch.randint(0, 11, (4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 3:] = True
    mask[2, 2:] = True
    all_rules(Albert(norm_first=True), [(ids,)], [0])
    all_rules(Albert(), [(ids, mask)], [0, 0])


@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (3, 4, 4)], ids=["N!=D", "N==D", "N,T,D"])
def test_linear_called_twice_in_a_row(shape):
    all_rules(LinearTwice(), [(torch.randn(*shape),)], [0])


# ---------------------------------------------------------------- a hand-written Llama
class HandRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x):  # (N, H, T, hd)
    t, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(t)[:, None].float() * inv[None]
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin


class LlamaBlock(nn.Module):
    """RMSNorm by hand, RoPE, grouped-query attention through SDPA(is_causal=True), SwiGLU, no biases."""

    def __init__(self, d=8, heads=4, kv=2, ff=12):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.n1, self.n2 = HandRMSNorm(d), HandRMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv * self.hd, bias=False)
        self.v = nn.Linear(d, kv * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        n, t, d = x.shape
        h = self.n1(x)
        q = rope(self.q(h).view(n, t, self.h, self.hd).transpose(1, 2))
        k = rope(self.k(h).view(n, t, self.kv, self.hd).transpose(1, 2))
        v = self.v(h).view(n, t, self.kv, self.hd).transpose(1, 2)
        rep = self.h // self.kv
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(n, t, d))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([LlamaBlock(d), LlamaBlock(d)])
        self.norm = HandRMSNorm(d)
        self.lm = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm(self.norm(h))


class BareParams(nn.Module):
    """``torch.einsum`` with a bare parameter, then ``h @ self.U``."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4) * 0.5)
        self.U = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(torch.einsum("ntd,de->nte", x, self.W))
        return self.head(torch.tanh(h @ self.U))


@pytest.mark.parametrize("n, t", [(3, 5), (4, 4), (2, 6)], ids=["N!=T", "N==T", "N<T"])
def test_hand_written_llama(n, t):
    all_rules(TinyLlama(), [(torch.randint(0, 13, (n, t)),)], [0])


@pytest.mark.parametrize("n, t", [(3, 4), (4, 4), (4, 1)], ids=["N!=T", "N==T==D", "T==1"])
def test_einsum_and_matmul_with_bare_parameters(n, t):
    all_rules(BareParams(), [(torch.randn(n, t, 4),)], [0])


# ---------------------------------------------------------------- RNN cells unrolled by hand
class CellLoop(nn.Module):
    """An RNN cell unrolled in a Python loop from an explicit zero state; batch-first or sequence-first input."""

    def __init__(self, cell="GRUCell", batch_first=True):
        super().__init__()
        self.cell = getattr(nn, cell)(4, 5)
        self.head = nn.Linear(5, 3)
        self.lstm = cell == "LSTMCell"
        self.batch_first = batch_first

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        n = x.shape[0]
        h = (torch.zeros(n, 5), torch.zeros(n, 5)) if self.lstm else torch.zeros(n, 5)
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h[0] if self.lstm else h)
        y = self.head(torch.stack(outs, 1))
        return y if self.batch_first else y.transpose(0, 1)


@pytest.mark.parametrize("cell", ["GRUCell", "RNNCell"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("n, t", [(3, 4), (4, 4)], ids=["N!=T", "N==T==D"])
def test_rnn_cell_unrolled_from_an_explicit_state(cell, batch_first, n, t):
    x = torch.randn(n, t, 4) if batch_first else torch.randn(t, n, 4)
    all_rules(CellLoop(cell, batch_first), [(x,)], [0 if batch_first else 1])


def test_lstm_cell_unrolled_is_exact_or_refused_by_name():
    """Never a silently wrong Omega: today the self-check refuses it (the module-local rule is wrong for
    ``nn.LSTMCell``, see the QA report) and the fallback it names is exact; once fixed, exact."""
    model = CellLoop("LSTMCell").eval()
    batches = [(torch.randn(3, 4, 4),)]
    try:
        default_exact(model, batches, [0])
    except VerificationError as exc:
        assert "cell.weight_ih" in str(exc) and "per_sample_fallback" in str(exc)
        default_exact(model, batches, [0], per_sample_fallback=lambda name: name.startswith("cell."))


# ---------------------------------------------------------------- packed sequences with lengths
class PackedRNN(nn.Module):
    def __init__(self, cell="LSTM", batch_first=True, unpack=True):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = getattr(nn, cell)(4, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)
        self.batch_first, self.unpack = batch_first, unpack

    def forward(self, ids, lengths):
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        if self.unpack:
            total = ids.shape[1 if self.batch_first else 0]
            return self.head(pad_packed_sequence(out, batch_first=self.batch_first, total_length=total)[0])
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.head(h[-1])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("unpack", [True, False], ids=["padded-out", "last-hidden"])
@pytest.mark.parametrize("n, t", [(3, 5), (4, 4)], ids=["N!=T", "N==T"])
def test_pack_padded_sequence_with_lengths(cell, unpack, n, t):
    model = PackedRNN(cell, unpack=unpack).eval()
    batches = [(torch.randint(0, 10, (n, t)), torch.tensor([t, 2, 3, 1][:n]))]
    default_exact(model, batches, [0, 0])
    batch_args(model, batches, [0, 0])
    with pytest.raises(ValueError, match="PackedSequence.*pad the batch.*global_batch"):
        mk.MAS(model, importance="local", forward=lambda m, b: m(*b)).estimate(batches)


def test_pack_padded_sequence_sequence_first():
    model = PackedRNN(batch_first=False).eval()
    batches = [(torch.randint(0, 10, (4, 4)), torch.tensor([4, 2, 3, 1]))]  # (T, N) ids, T == N
    default_exact(model, batches, [1, 0])
    batch_args(model, batches, [1, 0])


# ---------------------------------------------------------------- outputs and task ids
class TupleDictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h), {"aux": self.c(h), "features": h}


class TaskHeads(nn.Module):
    """A ``(N,)`` task id selects each sample's head: masked, or every head then a gather."""

    def __init__(self, gather, tasks=3):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 2) for _ in range(tasks))
        self.gather = gather

    def forward(self, x, task):
        h = torch.tanh(self.body(x))
        if self.gather:
            return torch.stack([head(h) for head in self.heads], 1)[torch.arange(x.shape[0]), task]
        out = torch.zeros(x.shape[0], 2)
        for t, head in enumerate(self.heads):
            mask = task == t
            if mask.any():
                out[mask] = head(h[mask])
        return out


class TaskFiLM(nn.Module):
    def __init__(self, tasks=3):
        super().__init__()
        self.film = nn.Embedding(tasks, 8)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, task):
        g, b = self.film(task).chunk(2, -1)
        return self.head(torch.tanh(self.body(x) * g + b))


@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_tuple_and_dict_outputs_with_output_fn(n):
    x = torch.randn(n, 4)
    all_rules(TupleDictOut(), [(x,)], [0], output_fn=lambda o: o[0])
    all_rules(TupleDictOut(), [(x,)], [0], output_fn=lambda o: o[1]["aux"])


@pytest.mark.parametrize("task", [[0, 2, 0], [1, 1, 1], [0, 1, 2, 1], [2, 0, 0, 1, 2]],
                         ids=["some-heads", "one-head", "N==C", "N==5"])
def test_task_id_argument_selects_a_head(task):
    task = torch.tensor(task)
    x = torch.randn(len(task), 4)
    all_rules(TaskHeads(gather=False), [(x, task)], [0, 0])
    all_rules(TaskHeads(gather=True), [(x, task)], [0, 0])
    all_rules(TaskFiLM(), [(x, task)], [0, 0])


def test_task_heads_over_batches_with_different_tasks():
    batches = [(torch.randn(3, 4), torch.tensor([0, 0, 0])), (torch.randn(3, 4), torch.tensor([1, 2, 1]))]
    all_rules(TaskHeads(gather=False), batches, [0, 0])


# ---------------------------------------------------------------- weights made by the model
class HyperShared(nn.Module):
    """A learned task vector -> a hypernetwork Linear -> the weight and bias of ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.task = nn.Parameter(torch.randn(3))
        self.hyper = nn.Linear(3, 20)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        p = self.hyper(self.task)
        return self.head(torch.tanh(F.linear(x, p[:16].view(4, 4), p[16:])))


class HyperPerSample(nn.Module):
    """Each sample's weight generated from its own context, applied with ``bmm``."""

    def __init__(self):
        super().__init__()
        self.hyper = nn.Linear(2, 12)
        self.head = nn.Linear(3, 2)

    def forward(self, x, ctx):
        w = self.hyper(ctx).view(-1, 3, 4)
        return self.head(torch.tanh(torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)))


class StandardizedConv(nn.Module):
    """Weight standardization over the whole tensor, in the model's forward: ``(w - w.mean()) / w.std()``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        w = self.conv.weight
        return self.head(torch.tanh(F.conv1d(x, (w - w.mean()) / w.std(), self.conv.bias)).mean(-1))


class WSConv2d(nn.Conv2d):
    """A Conv2d subclass whose forward standardizes its weight per output channel (BiT, NFNets)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = WSConv2d(3, 4, 3, padding=1)
        self.gn = randomize_norm(nn.GroupNorm(2, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.gn(self.conv(x))).mean((2, 3)))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def parametrized(kind):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    if kind == "orthogonal":
        parametrizations.orthogonal(model[0])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model[0])
    else:
        parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


@pytest.mark.parametrize("n", [3, 4, 5], ids=["N!=D", "N==D", "N>D"])
def test_hypernetworks(n):
    all_rules(HyperShared(), [(torch.randn(n, 4),)], [0])
    all_rules(HyperPerSample(), [(torch.randn(n, 4), torch.randn(n, 2))], [0, 0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C==T"])
def test_weight_standardization_in_the_models_forward(n):
    all_rules(StandardizedConv(), [(torch.randn(n, 3, 4),)], [0])


def test_a_conv2d_subclass_that_standardizes_its_weight_gets_no_conv2d_rule_and_is_exact():
    """A subclass that overrides ``forward`` is not run by its parent's rule (it was, and the self-check refused
    it; a smaller change of the output, a Linear scaled by 1.008, went through 0.8% off)."""
    model = WSNet().eval()
    x = torch.randn(4, 3, 4, 4)  # N == C
    default_exact(model, [(x,)], [0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batch_args(model, [(x,)], [0])
        local_count(model, [(x,)], 4)


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm", "custom-symmetric"])
@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_parametrizations(kind, n):
    all_rules(parametrized(kind), [(torch.randn(n, 4),)], [0])


# ---------------------------------------------------------------- what else a continual learner brings
class LoRALinear(nn.Linear):
    """LoRA as a Linear subclass: ``F.linear(x, W + B A, b)``."""

    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.A = nn.Parameter(torch.randn(r, i) * 0.3)
        self.B = nn.Parameter(torch.randn(o, r) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight + self.B @ self.A, self.bias)


class LoRAAdapter(nn.Module):
    """LoRA as a wrapper: ``base(x) + x A^T B^T``."""

    def __init__(self, i, o, r=2):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.A = nn.Parameter(torch.randn(r, i) * 0.3)
        self.B = nn.Parameter(torch.randn(o, r) * 0.3)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


class HandViT(nn.Module):
    """Patches by ``F.unfold``, a bare cls token expanded to the batch, bare position embeddings, LayerNorm."""

    def __init__(self, d=8, p=2):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(3 * p * p, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.norm = randomize_norm(nn.LayerNorm(d))
        self.head = nn.Linear(d, 3)

    def forward(self, img):
        patches = F.unfold(img, self.p, stride=self.p).transpose(1, 2)
        h = torch.cat([self.cls.expand(img.shape[0], -1, -1), self.proj(patches)], 1) + self.pos
        return self.head(self.norm(h)[:, 0])


@pytest.mark.parametrize("adapter", [LoRALinear, LoRAAdapter], ids=["subclass", "wrapper"])
@pytest.mark.parametrize("n", [3, 4], ids=["N!=D", "N==D"])
def test_lora(adapter, n):
    all_rules(nn.Sequential(adapter(4, 4), nn.Tanh(), nn.Linear(4, 2)), [(torch.randn(n, 4),)], [0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C==T"])
def test_hand_written_vit(n):
    all_rules(HandViT(), [(torch.randn(n, 3, 4, 4),)], [0])


def test_a_channels_last_cnn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), randomize_norm(nn.BatchNorm2d(4)), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    all_rules(model, [(torch.randn(4, 3, 4, 4).to(memory_format=torch.channels_last),)], [0])


def test_an_embedding_with_max_norm():
    """``max_norm`` renormalizes rows in place during the forward; the wrapper's passes see the same rows."""
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(16, 2))
    ids = torch.randint(0, 10, (3, 4))
    model(ids)  # renormalize the rows these ids touch first: the oracle then sees the weights the wrapper saw
    all_rules(model, [(ids,)], [0])


def test_sinusoidal_positions_shared_by_the_batch():
    """A (T, D) position table computed in the forward and added to every sample (shared, never sliced)."""
    class Sinusoid(nn.Module):
        def __init__(self, d=4):
            super().__init__()
            self.a = nn.Linear(d, d)
            self.head = nn.Linear(d, 2)

        def forward(self, x):
            t, d = x.shape[1], x.shape[2]
            pos = torch.arange(t)[:, None] * torch.exp(torch.arange(0, d, 2) * (-math.log(100.0) / d))
            pe = torch.cat([pos.sin(), pos.cos()], -1)
            return self.head(torch.tanh(self.a(x + pe)).cumsum(1))

    for n, t in [(4, 4), (3, 5)]:
        all_rules(Sinusoid(), [(torch.randn(n, t, 4),)], [0])


# ---------------------------------------------------------------- samples run one at a time, shared inputs
class PerSampleLoop(nn.Module):
    """The model loops over its batch in Python: every layer call is one unbatched sample ((D,) or (T, D))."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return torch.stack([self.head(torch.tanh(self.a(x[i])).cumsum(0)) for i in range(x.shape[0])])


class Prototypes(nn.Module):
    """The encoder applied to the batch and to K learned prototypes (a call the batch shares; K == N collides)."""

    def __init__(self, k):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.protos = nn.Parameter(torch.randn(k, 4))

    def forward(self, x):
        z, p = torch.tanh(self.f(x)), torch.tanh(self.f(self.protos))
        return -((z[:, None] - p[None]) ** 2).sum(-1)


class PerceiverLatents(nn.Module):
    """K learned latents expanded to the batch, cross-attending to the sample's tokens."""

    def __init__(self, k):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(k, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.inp = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        kv = self.inp(x)
        return self.head(self.attn(self.latents.expand(x.shape[0], -1, -1), kv, kv, need_weights=False)[0])


class Unpad(nn.Module):
    """Pad tokens dropped before the FFN (``h[mask]``, flash-attention style unpadding), scattered back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.ffn = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids, mask):
        h = self.emb(ids)
        out = torch.zeros_like(h)
        out[mask] = torch.tanh(self.ffn(h[mask]))
        return self.head(out.sum(1))


@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (3, 4, 4)], ids=["N!=D", "N==D", "N,T,D"])
def test_a_python_loop_over_the_samples(shape):
    all_rules(PerSampleLoop(), [(torch.randn(*shape),)], [0])


@pytest.mark.parametrize("k, n", [(3, 4), (4, 4)], ids=["K!=N", "K==N"])
def test_learned_prototypes_and_latents_shared_by_the_batch(k, n):
    all_rules(Prototypes(k), [(torch.randn(n, 4),)], [0])
    all_rules(PerceiverLatents(k), [(torch.randn(n, 4, 4),)], [0])


@pytest.mark.parametrize("lengths", [[3, 1, 2, 2], [3, 1, 2], [4, 4, 4, 4]], ids=["N==T", "N!=T", "no-padding"])
def test_unpadded_tokens_through_the_ffn_one_batch(lengths):
    """One batch per signature: a later batch of the same shape whose token count equals an earlier one's is
    the reported cached-layout defect."""
    torch.manual_seed(1)
    ids = torch.randint(0, 10, (len(lengths), 4))
    mask = torch.arange(4)[None] < torch.tensor(lengths)[:, None]
    all_rules(Unpad(), [(ids, mask)], [0, 0])


# ---------------------------------------------------------------- more layers read in other ways
class WeightRows(nn.Module):
    """An embedding's table read as ``emb.weight[ids]`` and a bare table through ``F.embedding``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.table = nn.Parameter(torch.randn(10, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb.weight[ids] + F.embedding(ids, self.table)).mean(1))


class NormsAndPaddings(nn.Module):
    """Conv1d ``padding="same"`` with reflect padding, GroupNorm with a group per channel, LayerNorm over (C, T),
    a ConvTranspose1d given ``output_size``."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.gn = randomize_norm(nn.GroupNorm(4, 4))
        self.ln = randomize_norm(nn.LayerNorm([4, 4]))
        self.up = nn.ConvTranspose1d(4, 2, 3, stride=2)

    def forward(self, x):  # (N, 3, 4)
        h = torch.tanh(self.ln(torch.tanh(self.gn(self.c(x)))))
        return self.up(h, output_size=[2 * x.shape[-1] + 1])


class DecoderLoop(nn.Module):
    """One TransformerDecoderLayer called twice, a causal target mask, memory from another argument."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        for m in self.layer.modules():
            if isinstance(m, nn.LayerNorm):
                randomize_norm(m)
        self.head = nn.Linear(8, 3)

    def forward(self, tgt, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = tgt
        for _ in range(2):
            h = self.layer(h, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.head(h)


@pytest.mark.parametrize("n", [3, 4], ids=["N!=T", "N==T==D"])
def test_embedding_tables_read_by_indexing(n):
    all_rules(WeightRows(), [(torch.randint(0, 10, (n, 4)),)], [0])


@pytest.mark.parametrize("n", [3, 4], ids=["N!=C", "N==C==T"])
def test_same_padding_groupnorm_per_channel_layernorm_over_c_t_and_output_size(n):
    all_rules(NormsAndPaddings(), [(torch.randn(n, 3, 4),)], [0])


@pytest.mark.parametrize("n, t, s", [(3, 4, 3), (4, 4, 4)], ids=["N!=T!=S", "N==T==S"])
def test_a_decoder_layer_called_in_a_loop(n, t, s):
    all_rules(DecoderLoop(), [(torch.randn(n, t, 8), torch.randn(n, s, 8))], [0, 0])


@pytest.mark.parametrize("n, t", [(3, 5), (4, 4)], ids=["N!=T", "N==T"])
def test_transformers_llama_exact_with_left_padding(n, t):
    """transformers' Llama (GQA, RoPE, RMSNorm) under the exact rule, a left-padded attention mask."""
    import transformers as tf

    torch.manual_seed(7)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=12,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=16)).eval()
    for m in model.modules():
        if "Norm" in type(m).__name__:
            randomize_norm(m)
    ids = torch.randint(0, 20, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, :2] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    logits = lambda o: o.logits  # noqa: E731
    mas = mk.MAS(model, importance="global", output_fn=logits).estimate([batch]).consolidate()
    expected = ref.global_exact(model, [batch], logits)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
    assert mas.samples_consolidated == n


# ---------------------------------------------------------------- defects this trial found (fixed)
class SortTied(nn.Module):
    """``fc`` used twice: on the batch, and on the batch sorted by its first feature (unsorted after)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        idx = x[:, 0].argsort()
        return self.head(torch.tanh(self.fc(x)) * self.fc(x[idx])[idx.argsort()])


class SortOnce(nn.Module):
    """A batch sorted by length and unsorted around a layer used once (a packed RNN's habit)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        idx = x[:, 0].argsort()
        return self.head(torch.tanh(self.fc(x[idx]))[idx.argsort()])


class OldWordLM(nn.Module):
    """PyTorch's examples/word_language_model (2017-2019): the decoder on ``output.view(T * N, H)``."""

    def __init__(self, cell="LSTM", vocab=13, dim=6, hidden=5):
        super().__init__()
        self.encoder, self.rnn = nn.Embedding(vocab, dim), getattr(nn, cell)(dim, hidden)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # (T, N)
        output, _ = self.rnn(self.encoder(tokens))
        decoded = self.decoder(output.view(output.size(0) * output.size(1), output.size(2)))
        return decoded.view(output.size(0), output.size(1), decoded.size(1))


def _routed(counts, t=3, d=4):
    """A batch for :class:`Top1MoE`-like routing on the first feature: sample k sends ``counts[k]`` tokens one way."""
    x = torch.randn(len(counts), t, d)
    x[..., 0] = -x[..., 0].abs() - 0.5
    for k, c in enumerate(counts):
        x[k, :c, 0] *= -1
    return x


class SignMoE(nn.Module):
    """Top-1 by the sign of the first feature: two experts, ``expert(tok[mask])`` scattered back."""

    def __init__(self, d=4):
        super().__init__()
        self.experts, self.head = nn.ModuleList(nn.Linear(d, d) for _ in range(2)), nn.Linear(d, 2)

    def forward(self, x):
        tok = x.reshape(-1, x.shape[-1])
        w, idx = torch.stack([10 * tok[:, 0], -10 * tok[:, 0]], -1).softmax(-1).max(-1)
        out = torch.zeros_like(tok)
        for e, ex in enumerate(self.experts):
            out[idx == e] = ex(tok[idx == e]) * w[idx == e, None]
        return self.head(torch.tanh(out.view(x.shape)))


@pytest.mark.parametrize("order", [[2., 1., 0., 3.], [3., 2., 1., 0.]], ids=["swap-0-2", "reversed"])
def test_a_layer_used_twice_with_the_rows_of_one_use_reordered(order):
    """Was 56% off on fc.weight with no word (the rows of the sorted use paired with the wrong samples)."""
    torch.manual_seed(4)
    x = torch.randn(4, 4)
    x[:, 0] = torch.tensor(order)
    default_exact(SortTied().eval(), [(x,)], [0])


def test_a_batch_sorted_and_unsorted_around_a_layer_used_once_is_exact_without_a_false_alarm():
    torch.manual_seed(4)
    x = torch.randn(5, 4)
    default_exact(SortOnce().eval(), [(x,)], [0])


def test_rows_the_data_chose_are_never_taken_for_samples_in_a_later_batch():
    """Expert 0 gets 4 rows (N) in both batches: one token per sample in the first, not in the second (was 18%
    off on experts.0.weight, no word)."""
    torch.manual_seed(0)
    default_exact(SignMoE().eval(), [(_routed([1, 1, 1, 1]),), (_routed([2, 0, 1, 1]),)], [0])


def test_unpadded_tokens_over_batches_whose_token_counts_match():
    """8 tokens in both batches, 2 per sample in the first (was 27% off on ffn.weight)."""
    torch.manual_seed(1)

    def mask(lengths):
        return torch.arange(4)[None] < torch.tensor(lengths)[:, None]

    batches = [(torch.randint(0, 10, (4, 4)), mask([2, 2, 2, 2])), (torch.randint(0, 10, (4, 4)), mask([4, 1, 2, 1]))]
    default_exact(Unpad().eval(), batches, [0, 0])


@pytest.mark.parametrize("seed, shapes", [(0, [(5, 2)]), (10, [(4, 4), (2, 4)]), (10, [(5, 2), (2, 2)])])
def test_random_top1_routing_over_batches(seed, shapes):
    """Seeds where the routing made rows look like samples (27% off), or an expert idle in the self-check's
    samples (an internal error), or the probe's broadcast broke the model's own scatter."""
    torch.manual_seed(seed)
    model = Top1MoE().eval()
    default_exact(model, [(torch.randn(n, t, 4),) for n, t in shapes], [0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_a_sequence_first_rnn_output_viewed_flat(cell):
    """``output.view(T * N, H)``: was a torch error (the replayed output was not contiguous); its rows are
    time-major, which the probe now sees by value (the decoder's parameters get the per-sample fallback)."""
    torch.manual_seed(0)
    default_exact(OldWordLM(cell).eval(), [(torch.randint(0, 13, (5, 3)),), (torch.randint(0, 13, (4, 4)),)], [1])


@pytest.mark.parametrize("scale", [1.5, 1.008])
def test_a_linear_subclass_that_scales_its_output_gets_no_linear_rule(scale):
    """Was 0.79% off at 1.008 with no word (under the self-check's tolerance), refused at 1.5."""

    class ScaledLinear(nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, x):
            return super().forward(x) * self.scale

    torch.manual_seed(0)
    default_exact(nn.Sequential(ScaledLinear(4, 4), nn.Tanh(), nn.Linear(4, 2)).eval(), [(torch.randn(5, 4),)], [0])


class ConvBothWays(nn.Module):
    """A Conv1d called as a layer and its weight used again through ``F.conv1d`` (a tied second pass)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(F.conv1d(h, self.conv.weight, padding=1)).mean(-1))


@pytest.mark.parametrize("model, batch", [(WeightRows, lambda: torch.randint(0, 10, (3, 4))),
                                          (ConvBothWays, lambda: torch.randn(4, 3, 5))], ids=["rows", "conv-twice"])
def test_local_on_a_weight_used_outside_its_layer(model, batch):
    """``"local"``: a weight read outside the layer whose rule covers it is uncovered (that rule sees none of
    those uses; was Omega 0 for ``emb.weight[ids]``, no word): the exact rule for it under the default
    ``uncovered="global"``, zero with ``"skip"``, refused with ``"error"``, named in a warning."""
    torch.manual_seed(0)
    model = model().eval()
    x = batch()
    stray = {"rows": ["emb.weight", "table"], "conv-twice": ["conv.weight"]}["rows" if isinstance(model, WeightRows)
                                                                             else "conv-twice"]
    want = ref.global_exact_args(model, [(x,)], [0])
    mas = mk.MAS(model, importance="local", forward=lambda m, b: m(*b))
    with pytest.warns(RuntimeWarning, match=r"used outside the layers whose local rules cover them"):
        mas.estimate([(x,)]).consolidate()
    close({n: mas.omega[n] for n in stray}, {n: want[n] for n in stray})
    mas = mk.MAS(model, importance="local", forward=lambda m, b: m(*b), uncovered="skip")
    with pytest.warns(RuntimeWarning, match="zero importance"):
        mas.estimate([(x,)]).consolidate()
    assert all(float(mas.omega[n].abs().sum()) == 0.0 for n in stray)
    with pytest.raises(ValueError, match=r"uncovered='error'.*(table|conv\.weight)"):
        mk.MAS(model, importance="local", forward=lambda m, b: m(*b), uncovered="error").estimate([(x,)])


class CellNoState(nn.Module):
    """An RNN cell unrolled from ``hx=None`` (the cell makes its own zero state), batch-first."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.head = getattr(nn, cell)(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # (N, T, D)
        h, outs = None, []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h[0] if isinstance(h, tuple) else h)
        return self.head(torch.stack(outs, 1))


@pytest.mark.parametrize("cell", ["GRUCell", "LSTMCell", "RNNCell"])
def test_rnn_cells_from_no_state(cell):
    """Was a torch error (the per-sample rule's vmap met the zero state the cell makes for the call's batch);
    now exact (refused by name is also within the contract for the LSTM cell, whose rule is checked)."""
    torch.manual_seed(0)
    model = CellNoState(cell).eval()
    batches = [(torch.randn(3, 4, 4),)]
    try:
        default_exact(model, batches, [0])
    except VerificationError as exc:
        assert cell == "LSTMCell" and "cell." in str(exc)
        default_exact(model, batches, [0], per_sample_fallback=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        local_count(model, batches, 3)


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("t", [4, 5], ids=["T==C", "T!=C"])
def test_instance_norm_local_per_channel(track, t):
    """``"local"`` on ``nn.InstanceNorm1d(affine=True)``: ``|y * x_hat|`` and ``|y|`` summed per channel (dim 1)
    over samples and positions, ``x_hat`` by the statistics the layer used. Was refused for T != C (whatever
    ``uncovered=`` said) and summed along T when T == C."""
    torch.manual_seed(0)
    norm = randomize_norm(nn.InstanceNorm1d(4, affine=True, track_running_stats=track))
    if track:
        with torch.no_grad():
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), norm, nn.Flatten(), nn.Linear(4 * t, 2)).eval()
    x = torch.randn(3, 3, t)
    mas = mk.MAS(model, importance="local").estimate([x]).consolidate()
    with torch.no_grad():
        h = model[0](x).double()
        if track:
            mean, var = norm.running_mean.double()[:, None], norm.running_var.double()[:, None]
        else:
            var, mean = torch.var_mean(h, -1, unbiased=False, keepdim=True)
        x_hat = (h - mean) / (var + norm.eps).sqrt()
        y = x_hat * norm.weight.double()[:, None] + norm.bias.double()[:, None]
    close({"1.weight": mas.omega["1.weight"], "1.bias": mas.omega["1.bias"]},
          {"1.weight": (y * x_hat).abs().sum((0, 2)) / 3, "1.bias": y.abs().sum((0, 2)) / 3})


class TimeFirstRows(nn.Module):
    """A sequence-first ``(T, N, D)`` batch flattened time-major, ``x.reshape(T * N, D)``, into a Linear."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        t, n, d = x.shape
        return self.head(torch.tanh(self.fc(x.reshape(t * n, d))).view(t, n, -1))


@pytest.mark.parametrize("shape", [(3, 4, 4), (4, 4, 4), (5, 3, 4)], ids=["T<N", "T==N", "T>N"])
def test_rows_flattened_time_major(shape):
    """Was refused by the self-check, with ``sample_dim=`` advice that did not help: the probe now sees by value
    that the rows are not sample-major (``fc`` gets the per-sample fallback)."""
    torch.manual_seed(0)
    default_exact(TimeFirstRows().eval(), [(torch.randn(*shape),)], [1], sample_dim=1)


class LSTMCellStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(4, 5), nn.Linear(5, 2)

    def forward(self, x, h, c):
        h2, c2 = self.cell(x, (h, c))
        return self.head(h2 + 0.5 * c2)


@pytest.mark.parametrize("verify", [False, True])
def test_a_layer_whose_outputs_are_computed_from_each_other(verify):
    """An LSTM cell's ``h`` is computed from its ``c``: the gradient at ``c``'s own edge also holds what flowed
    back through ``h``, and the generic rule pulled both through the cell (was 88% off with verify=False,
    refused by the self-check otherwise); each output of a multi-output call is now handed on as its own view."""
    torch.manual_seed(0)
    b = (torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5))
    default_exact(LSTMCellStep().eval(), [b], [0, 0, 0], verify=verify)


def test_embedding_bag_offsets_with_sample_dim_on_the_offsets():
    """``sample_dim={0: None, 1: 0}``: the flat ids shared, the bags along the offsets. N is the bag count for
    ``global_batch`` and ``local`` (was the token count, and this ``sample_dim`` was rejected); the exact rule
    still refuses by name (a sub-batch of offsets alone is not those bags)."""
    torch.manual_seed(0)
    model = Bag("sum").eval()
    flat, offsets = torch.randint(0, 10, (7,)), torch.tensor([0, 2, 5])
    sd = {0: None, 1: 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mas = mk.MAS(model, importance="global_batch", forward=lambda m, b: m(*b), sample_dim=sd)
        mas.estimate([(flat, offsets)]).consolidate()
        close(mas.omega, ref.global_batch_args(model, [(flat, offsets)], [None, 0]))
        mas = mk.MAS(model, importance="local", forward=lambda m, b: m(*b), sample_dim=sd, uncovered="skip")
        mas.estimate([(flat, offsets)])
        assert mas.num_samples == 3
        with pytest.raises(ValueError, match="global_batch"):
            mk.MAS(model, importance="global", forward=lambda m, b: m(*b), sample_dim=sd).estimate([(flat, offsets)])
    with pytest.raises(ValueError, match="every tensor argument of the model is shared"):
        mk.MAS(model, importance="global_batch", forward=lambda m, b: m(*b),
               sample_dim={0: None, 1: None}).estimate([(flat, offsets)])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["top1", "top2", "unpad"]),
       sizes=st.lists(st.tuples(st.integers(2, 5), st.integers(1, 4)), min_size=1, max_size=3))
def test_routing_and_unpadding_over_random_batches(seed, kind, sizes):
    """Rows the data chose, over batches of random sizes that collide or not (N == T, expert rows == N): exact
    against the oracle every time (a scan of 150 such cases found 12 silently wrong before this round)."""
    torch.manual_seed(seed)
    if kind == "unpad":
        batches = [(torch.randint(0, 10, (n, 4)), torch.arange(4)[None] < torch.randint(1, 5, (n,))[:, None])
                   for n, _ in sizes]
        default_exact(Unpad().eval(), batches, [0, 0])
    else:
        batches = [(torch.randn(n, t, 4),) for n, t in sizes]
        default_exact((Top1MoE() if kind == "top1" else Top2MoE()).eval(), batches, [0])


# ---------------------------------------------------------------- layers changed by hooks, and CNN variants
def _hooked(kind):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "old weight_norm":  # torch.nn.utils.weight_norm: a forward pre-hook recomputes the weight
        model[0] = torch.nn.utils.weight_norm(model[0])
    elif kind == "old spectral_norm":
        model[0] = torch.nn.utils.spectral_norm(model[0])
    elif kind == "prune":  # a forward pre-hook: weight = weight_orig * mask
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.4)
    elif kind == "backward hook":
        model[0].register_full_backward_hook(lambda m, gi, go: None)
    elif kind == "input pre-hook":  # a pre-hook that changes what the layer gets
        model[2].register_forward_pre_hook(lambda m, a: (a[0] * 2 + 1,))
    return model


@pytest.mark.parametrize("kind", ["old weight_norm", "old spectral_norm", "prune", "backward hook", "input pre-hook"])
def test_layers_changed_by_torchs_hook_based_utilities(kind):
    """What torch's hook-based utilities and a user's hooks do to a layer, seen by every rule (the exact rule's
    wrappers run inside the module's hooks: the weight the pre-hook set, the input it changed)."""
    import torch.nn.utils.prune  # noqa: F401

    torch.manual_seed(0)
    all_rules(_hooked(kind), [(torch.randn(6, 4),)], [0])


def _bn(c):
    norm = nn.BatchNorm2d(c)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    return randomize_norm(norm)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2), nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
        return self.head((h * g[:, :, None, None]).mean((2, 3)))


@pytest.mark.parametrize("kind", ["mobilenet", "conv transpose", "squeeze-excite"])
def test_cnn_variants(kind):
    """Depthwise-separable blocks with BatchNorm and ReLU6 in place, a transposed convolution, squeeze-and-
    excitation gates."""
    torch.manual_seed(0)
    if kind == "mobilenet":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU6(inplace=True),
                              nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _bn(8), nn.ReLU6(inplace=True),
                              nn.Conv2d(8, 16, 1, bias=False), _bn(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(16, 3))
        x = torch.randn(4, 3, 9, 9)
    elif kind == "conv transpose":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 4, 2, 1))
        x = torch.randn(3, 3, 8, 8)
    else:
        model, x = SqueezeExcite(), torch.randn(4, 3, 6, 6)
    all_rules(model, [(x,)], [0])


@pytest.mark.parametrize("name", ["roberta", "albert", "mixtral", "t5-seq2seq"])
def test_more_transformers_models_against_the_oracle(name):
    """transformers' RoBERTa (position ids computed from the padding mask: data-dependent rows), ALBERT (one
    layer's parameters reused by every layer), Mixtral (token-choice experts) and T5 with its decoder, small
    configs: the default exact rule equals the one-sample oracle; the other rules run."""
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:], ids[0, 5:] = 0, 1
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32)
    batch, out = {"input_ids": ids, "attention_mask": mask}, (lambda o: o.last_hidden_state)
    if name == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(**cfg, pad_token_id=1))
    elif name == "albert":
        model = tf.AlbertModel(tf.AlbertConfig(**cfg, embedding_size=8))
    elif name == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**{**cfg, "num_hidden_layers": 1}, num_key_value_heads=1,
                                                       num_local_experts=4, num_experts_per_tok=2))
        batch, out = {"input_ids": ids}, (lambda o: o.logits)
    else:
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                          num_decoder_layers=2, num_heads=2, decoder_start_token_id=0))
        batch, out = {**batch, "decoder_input_ids": torch.randint(0, 50, (3, 4))}, (lambda o: o.logits)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mas = mk.MAS(model, importance="global", output_fn=out).estimate([batch]).consolidate()
        for importance in ("global_batch", "local"):
            mk.MAS(model, importance=importance, output_fn=out).estimate([batch]).consolidate()
    expected = ref.global_exact(model, [batch], out)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
