"""The exact rule's fast paths for transformers, against the one-sample oracle.

* ``nn.MultiheadAttention`` in the recorded pass (``MultiheadAttentionRule.inline_forward``): its output is
  the module's own, the gradients at its projections come from the one backward (no replay), and the
  importance equals the per-sample definition, for every way the module is called (self/cross attention,
  separate k/v projections, masks, causal, weights returned, batch_first, unbatched); the configurations it
  cannot stand in for (``add_bias_kv``, ``add_zero_attn``) keep the replay;
* the gradients at the layers' outputs, outputs overwritten in place included;
* a tied embedding and LM head (``ExactEstimator._sparse_and_dense``): every sample's rows in one batched
  product, with samples of different numbers of distinct tokens.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mas_kernels as mk
from mas_kernels.estimators import global_exact
from mas_kernels.estimators.rules import attention
from tests.helpers import HYPOTHESIS
from tests.test_exact_layers import close


class Attn(nn.Module):
    """``head(mha(q, k, v))`` (plus a function of the attention weights when they are returned)."""

    def __init__(self, e: int, heads: int, batch_first: bool, kind: str, kdim: int | None = None, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=kdim, **kw)
        self.kv = nn.Linear(e, kdim or e)
        self.head = nn.Linear(e, 3)
        self.kind, self.batch_first = kind, batch_first

    def qkv(self, x):
        if self.kind == "self":
            return x, x, x
        if self.kind == "cross":
            k = torch.tanh(self.kv(x))
            return x, k, k
        return x, torch.tanh(self.kv(x)), self.kv(x) * 0.5

    def forward(self, x, kpm=None, mask=None, need_weights=False, causal=False):
        q, k, v = self.qkv(x)
        out, w = self.mha(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights,
                          is_causal=causal)
        y = self.head(out)
        if w is not None:  # (N, L, S) or (N, H, L, S) whatever the layout: its rows, as positions of y
            w2 = (w * w).sum(-1)
            w2 = w2.sum(1) if w2.dim() == 3 else w2
            if x.dim() == 2:
                y = y + w2.reshape(-1, 1)
            else:
                y = y + (w2 if self.batch_first else w2.T).unsqueeze(-1)
        return y


def oracle(model, x, kpm, mask, dim, **kw):
    """``(1/N) sum_k |d ||F(x_k)||^2 / d theta|``, one sample at a time, in float64."""
    m = model.double()
    n = x.shape[dim]
    exp = {name: torch.zeros_like(p) for name, p in m.named_parameters()}
    for k in range(n):
        xk = x.double().narrow(dim, k, 1)
        out = m(xk, None if kpm is None else kpm[k:k + 1], None if mask is None else mask.double()
                if mask.is_floating_point() else mask, **kw)
        gs = torch.autograd.grad(out.pow(2).sum(), list(m.parameters()), allow_unused=True)
        for (name, _), g in zip(m.named_parameters(), gs):
            if g is not None:
                exp[name] += g.abs() / n
    model.float()
    return exp


def estimate(model, x, kpm, mask, dim=0, **kw):
    # sample_dim said: a (T, T) mask of T == N samples cannot tell its samples from its positions
    where = {0: dim, **({1: 0} if kpm is not None else {}), **({2: None} if mask is not None else {})}
    return mk.MAS(model, importance="global", forward=lambda m, b: m(b[0], b[1], mask, **kw),
                  sample_dim=where).estimate([(x, kpm)]).consolidate().omega


def inlined(model, x, kpm, mask, dim=0, **kw) -> bool:
    """Whether the recorded pass ran the rule's inline forward (its taps on the call)."""
    seen = []
    real = attention.MultiheadAttentionRule.exact

    def spy(self, layer, calls, ctx, accs):
        seen.extend(isinstance(c.replay, attention._Taps) for c in calls)
        return real(self, layer, calls, ctx, accs)

    attention.MultiheadAttentionRule.exact = spy
    try:
        estimate(model, x, kpm, mask, dim, **kw)
    finally:
        attention.MultiheadAttentionRule.exact = real
    return bool(seen) and all(seen)


@settings(max_examples=30, **HYPOTHESIS)
@given(kind=st.sampled_from(["self", "cross", "separate"]), batch_first=st.booleans(), need=st.booleans(),
       bias=st.booleans(), kdim=st.sampled_from([None, 5]), pad=st.booleans(),
       mask=st.sampled_from([None, "bool", "float", "causal"]), n=st.integers(1, 4), t=st.integers(3, 6),
       seed=st.integers(0, 2**16))
def test_mha_inline_forward_against_the_oracle(kind, batch_first, need, bias, kdim, pad, mask, n, t, seed):
    # t >= 3: a query that sees one key alone has a zero gradient, and float32 round-off is all it holds
    if kdim is not None and kind == "self":
        kdim = None  # self-attention takes the query as key and value: kdim = embed_dim
    torch.manual_seed(seed)
    model = Attn(8, 2, batch_first, kind, kdim=kdim, bias=bias).eval()
    x = torch.randn(n, t, 8) if batch_first else torch.randn(t, n, 8)
    kpm = None
    if pad:
        kpm = torch.zeros(n, t, dtype=torch.bool)
        kpm[0, t - 1] = True
    am, kw = None, {"need_weights": need}
    if mask == "bool":
        am = torch.zeros(t, t, dtype=torch.bool)
        am[0, t - 1] = True
    elif mask == "float":
        am = torch.randn(t, t) * 0.5
    elif mask == "causal":
        am = nn.Transformer.generate_square_subsequent_mask(t)
        kw["causal"] = True
    # the inline forward is the module's own forward
    a = attention._mha_arguments(model.mha, attention.Call_(
        model.qkv(x), dict(key_padding_mask=kpm, attn_mask=am, need_weights=need, is_causal=kw.get("causal", False))))
    (got, w), _ = attention._attention(model.mha, a, attention._Taps())
    want, w0 = model.mha(*model.qkv(x), key_padding_mask=kpm, attn_mask=am, need_weights=need,
                         is_causal=kw.get("causal", False))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (w is None) == (w0 is None)
    if w is not None:
        torch.testing.assert_close(w, w0, atol=1e-6, rtol=1e-5)
    # the importance, by the one backward
    dim = 0 if batch_first else 1
    omega = estimate(model, x, kpm, am, dim, **kw)
    # float32 round-off of the softmax's backward reaches ~3e-6 of a parameter's scale here (cross-attention,
    # kdim 5, one sample, a padded key: seed 306; the same pass in float64 agrees to 1e-16), above close()'s
    # default atol of 1e-6; a wrong rule is off by percents
    close(omega, oracle(model, x, kpm, am, dim, **kw), tol=dict(rtol=2e-5, atol=1e-5))
    assert inlined(model, x, kpm, am, dim, **kw)


def test_mha_unbatched_input():
    torch.manual_seed(0)
    model = Attn(8, 2, True, "self").eval()
    x = torch.randn(5, 8)  # one sample, no batch dim
    omega = mk.MAS(model, importance="global").estimate([x]).consolidate().omega
    out = model.double()(x.double())
    gs = torch.autograd.grad(out.pow(2).sum(), list(model.parameters()), materialize_grads=True)
    close(omega, {name: g.abs() for (name, _), g in zip(model.named_parameters(), gs)})


@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(add_zero_attn=True)])
def test_mha_configurations_the_inline_forward_leaves_to_the_replay(kw):
    torch.manual_seed(0)
    model = Attn(8, 2, True, "self", **kw).eval()
    x = torch.randn(3, 4, 8)
    close(estimate(model, x, None, None), oracle(model, x, None, None, 0))
    assert not inlined(model, x, None, None)


def test_mha_in_train_mode_with_dropout_is_left_to_its_own_forward():
    layer = nn.MultiheadAttention(8, 2, dropout=0.5)
    assert attention._inlinable(layer.eval()) and not attention._inlinable(layer.train())


def test_transformer_encoder_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
                                                2, enable_nested_tensor=False), nn.Linear(8, 3)).eval()
    x = torch.randn(3, 5, 8)
    omega = mk.MAS(model, importance="global").estimate([x]).consolidate().omega
    close(omega, oracle_plain(model, x))


def oracle_plain(model, x):
    m = model.double()
    exp = {name: torch.zeros_like(p) for name, p in m.named_parameters()}
    for k in range(x.shape[0]):
        gs = torch.autograd.grad(m(x[k:k + 1].double()).pow(2).sum(), list(m.parameters()), materialize_grads=True)
        for (name, _), g in zip(m.named_parameters(), gs):
            exp[name] += g.abs() / x.shape[0]
    model.float()
    return exp


@pytest.mark.parametrize("inplace", [True, False])
def test_outputs_overwritten_in_place_twice(inplace):
    # The gradient at a layer's output as the layer returned it, though two in-place ops overwrite it.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            if inplace:
                h.mul_(1.5).relu_()
            else:
                h = (h * 1.5).relu()
            return self.b(h)

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 3, 4)
    omega = mk.MAS(model, importance="global").estimate([x]).consolidate().omega
    close(omega, oracle_plain(model, x))


@settings(max_examples=15, **HYPOTHESIS)
@given(n=st.integers(1, 5), t=st.integers(1, 7), vocab=st.integers(3, 12), seed=st.integers(0, 2**16))
def test_tied_embedding_and_head(n, t, vocab, seed):
    # Samples with different numbers of distinct tokens (a repeated id, a sample of one token).
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    torch.manual_seed(seed)
    model = LM()
    ids = torch.randint(0, vocab, (n, t))
    ids[0] = ids[0, 0]  # one sample with a single distinct id
    omega = mk.MAS(model, importance="global").estimate([ids]).consolidate().omega
    m = model.double()
    exp = {name: torch.zeros_like(p) for name, p in m.named_parameters()}
    for k in range(n):
        gs = torch.autograd.grad(m(ids[k:k + 1]).pow(2).sum(), list(m.parameters()))
        for (name, _), g in zip(m.named_parameters(), gs):
            exp[name] += g.abs() / n
    close(omega, exp)


def test_sparse_and_dense_is_the_per_sample_loop():
    # The batched correction against the literal loop it replaced, on random factors.
    torch.manual_seed(0)
    n, t, v, d = 4, 6, 9, 5
    a, b = torch.randn(n, t, v), torch.randn(n, t, d)
    sample = torch.tensor([0, 0, 1, 3, 3, 3])
    row = torch.tensor([1, 4, 2, 0, 4, 8])
    e = torch.randn(6, d)
    want = torch.zeros(v, d)
    mk.abs_bmm_accumulate_(want, a, b)
    for k in sample.unique().tolist():
        sel = (sample == k).nonzero()[:, 0]
        dense = a[k][:, row[sel]].T @ b[k]
        want.index_add_(0, row[sel], (dense + e[sel]).abs() - dense.abs())

    class Emb:
        module = "embedding"

        class rule:
            @staticmethod
            def sparse_rows(layer, calls, ctx, attr):
                return sample, row, e

    got = torch.zeros(v, d)
    ctx = global_exact.Context(n)
    global_exact.ExactEstimator._sparse_and_dense([(Emb, "weight")], [(a, b)], {"embedding": []}, ctx, got)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masked", [False, True])
def test_vit_embeddings_from_the_output_gradient(masked):
    # cls_token and position_embeddings read off the embeddings' output gradient; masked positions (the
    # mask token, a blend) keep the module-local per-sample vjp. Either way: the oracle.
    from transformers import ViTConfig, ViTModel

    from mas_kernels.estimators.rules import hf
    from tests import models
    from tests import reference as ref

    torch.manual_seed(0)
    model = models.randomize_norms(ViTModel(ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=20), use_mask_token=masked)).eval()
    with torch.no_grad():
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_()
        if masked:
            model.embeddings.mask_token.normal_()
    batch = {"pixel_values": torch.randn(3, 3, 8, 8)}
    if masked:
        batch["bool_masked_pos"] = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    direct = []
    real = hf.ViTEmbeddingsRule.exact

    def spy(self, layer, calls, ctx, accs):
        direct.append(all(hf._adds_only(layer.module, c, ctx.n) for c in calls) and "mask_token" not in accs)
        return real(self, layer, calls, ctx, accs)

    hf.ViTEmbeddingsRule.exact = spy
    try:
        mas = mk.MAS(model, importance="global", output_fn=lambda o: o.last_hidden_state).estimate([batch])
    finally:
        hf.ViTEmbeddingsRule.exact = real
    close(mas.consolidate().omega, ref.global_exact(model, [batch], lambda o: o.last_hidden_state))
    assert direct and all(d == (not masked) for d in direct)


@pytest.mark.parametrize("layer", ["mha", "lstm"])
def test_another_threads_forward_inside_an_inline_forward_pass(layer):
    # A forward of the same model in another thread, in the middle of the recorded pass, runs the layers'
    # own forwards: it leaves no replay for the estimating thread's calls to pick up.
    from tests.test_session_reliability import forward_in_another_thread

    torch.manual_seed(0)
    if layer == "mha":
        model = Attn(8, 2, True, "self").eval()
    else:
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(8, 5, batch_first=True)
                self.head = nn.Linear(5, 3)

            def forward(self, x):
                return self.head(self.rnn(x)[0])

        model = Net().eval()
    x = torch.randn(3, 4, 8)
    with forward_in_another_thread(model, model.head, lambda: torch.randn(5, 4, 8)) as runs:
        omega = mk.MAS(model, importance="global").estimate([x]).consolidate().omega
    assert runs[0] >= 1
    close(omega, oracle_plain(model, x))
