"""The native RNN/LSTM/GRU step loop of the exact rule (rules/rnn_native.py, csrc/rnn_steps.cpp) against torch:
its outputs against the layer's own forward, the gradients its backward gives the main backward (input, initial
state) against autograd through the layer, and the per-step gate gradients ``dzi`` against autograd through a
float64 cell written out, with ``zi = x W_ih^T + b_ih`` kept as a graph node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mas_kernels import _backend
from mas_kernels.estimators.rules import rnn_native

NATIVE = pytest.mark.skipif(not _backend.native_available(), reason="the native extension is not built")
F64 = torch.float64


def reference(m, x, hx, g_out, g_h, g_c):
    """float64: (output, h_n, c_n, {(layer, reverse): dzi}, dx, dh0, dc0) for the loss <out, g_out> + <h_n, g_h>
    (+ <c_n, g_c>), the cell written out step by step."""
    dirs = 2 if m.bidirectional else 1
    H = m.hidden_size
    x = x.detach().double().requires_grad_()
    n, steps = x.shape[:2]
    if hx is None:
        h0 = torch.zeros(m.num_layers * dirs, n, H, dtype=F64, requires_grad=True)
        c0 = torch.zeros_like(h0, requires_grad=True)
    else:
        h0 = (hx[0] if m.mode == "LSTM" else hx).detach().double().requires_grad_()
        c0 = hx[1].detach().double().requires_grad_() if m.mode == "LSTM" else torch.zeros_like(h0)
    zis, hs_n, cs_n = {}, [], []
    inp = x
    for layer in range(m.num_layers):
        seqs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + sfx).double(), getattr(m, "weight_hh" + sfx).double()
            b_ih = getattr(m, "bias_ih" + sfx).double() if m.bias else 0
            b_hh = getattr(m, "bias_hh" + sfx).double() if m.bias else 0
            zi = inp @ w_ih.T + b_ih
            zi.retain_grad()
            zis[(layer, d == 1)] = zi
            h, c = h0[layer * dirs + d], c0[layer * dirs + d]
            hs = [None] * steps
            for t in (range(steps - 1, -1, -1) if d else range(steps)):
                zh = h @ w_hh.T + b_hh
                if m.mode == "LSTM":
                    i, f, g, o = (zi[:, t] + zh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif m.mode == "GRU":
                    (ri, ui, ni), (rh, uh, nh) = zi[:, t].chunk(3, 1), zh.chunk(3, 1)
                    r, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
                    h = (1 - u) * torch.tanh(ni + r * nh) + u * h
                else:
                    h = torch.tanh(zi[:, t] + zh) if m.mode == "RNN_TANH" else torch.relu(zi[:, t] + zh)
                hs[t] = h
            seqs.append(torch.stack(hs, 1))
            hs_n.append(h)
            cs_n.append(c)
        inp = torch.cat(seqs, 2)
    h_n, c_n = torch.stack(hs_n), torch.stack(cs_n)
    loss = (inp * g_out.double()).sum() + (h_n * g_h.double()).sum()
    if m.mode == "LSTM":
        loss = loss + (c_n * g_c.double()).sum()
    loss.backward()
    return inp, h_n, c_n, {k: z.grad for k, z in zis.items()}, x.grad, h0.grad, c0.grad


CASES = [(cell, kw) for cell in (nn.LSTM, nn.GRU, nn.RNN) for kw in (
    dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=3, bias=False), dict(nonlinearity="relu"))
    if cell is nn.RNN or "nonlinearity" not in kw]


@NATIVE
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("cell, kw", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
def test_native_steps_match_torch(cell, kw, with_state):
    torch.manual_seed(0)
    m = cell(5, 4, batch_first=True, **kw).eval()
    dirs = 2 if m.bidirectional else 1
    n, steps = 3, 7
    x = torch.randn(n, steps, 5, requires_grad=True)
    hx = None
    if with_state:
        h0 = torch.randn(m.num_layers * dirs, n, 4, requires_grad=True)
        hx = (h0, torch.randn(m.num_layers * dirs, n, 4, requires_grad=True)) if m.mode == "LSTM" else h0
    assert rnn_native.serves(m, x)
    rep = rnn_native.NativeReplay(m, x, hx, False)
    out = rep.outputs()
    h_n, c_n = (out[1] if m.mode == "LSTM" else (out[1], None))
    expected_out = m(x, hx)
    exp_h = expected_out[1][0] if m.mode == "LSTM" else expected_out[1]
    torch.testing.assert_close(out[0], expected_out[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_n, exp_h, atol=1e-6, rtol=1e-5)
    if m.mode == "LSTM":
        torch.testing.assert_close(c_n, expected_out[1][1], atol=1e-6, rtol=1e-5)

    g_out, g_h, g_c = torch.randn_like(out[0]), torch.randn_like(h_n), torch.randn_like(h_n)
    loss = (out[0] * g_out).sum() + (h_n * g_h).sum() + ((c_n * g_c).sum() if c_n is not None else 0)
    wrt = [x] + ([hx[0], hx[1]] if m.mode == "LSTM" and hx else [hx] if hx is not None else [])
    got = torch.autograd.grad(loss, wrt + rep.targets())
    ref_out, _, _, dzi, dx, dh0, dc0 = reference(m, x, hx, g_out, g_h, g_c)
    torch.testing.assert_close(out[0].double(), ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0].double(), dx, atol=1e-6, rtol=1e-5)
    if hx is not None:
        torch.testing.assert_close(got[1].double(), dh0, atol=1e-6, rtol=1e-5)
        if m.mode == "LSTM":
            torch.testing.assert_close(got[2].double(), dc0, atol=1e-6, rtol=1e-5)
    grads = rep.grads()
    assert set(grads) == set(dzi)
    for key, (d_i, d_h) in grads.items():
        torch.testing.assert_close(d_i.double(), dzi[key], atol=1e-6, rtol=1e-5, msg=lambda s: f"{key}: {s}")


@NATIVE
def test_the_python_replay_serves_what_the_native_loop_does_not():
    m = nn.LSTM(5, 4, batch_first=True)
    assert not rnn_native.serves(m, torch.randn(2, 3, 5, dtype=torch.float64))
    assert not rnn_native.serves(nn.LSTM(5, 4, proj_size=2), torch.randn(2, 3, 5))
    assert not rnn_native.serves(m, torch.randn(2, 0, 5))
    with _backend.using("torch"):
        assert not rnn_native.serves(m, torch.randn(2, 3, 5))


@pytest.mark.parametrize("backend", [b for b in ("native", "torch") if b != "native" or _backend.native_available()])
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_an_initial_state_from_upstream_layers_passes_their_importance_on(backend, cell):
    """Regression: the Python replay detached the call's initial state, so a layer computing it (an encoder's
    final state into a decoder) got no gradient through it: relative error 1.0 against the oracle."""
    import mas_kernels as mk
    from tests import reference as ref

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 5)
            self.rnn = cell(4, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            h0 = torch.tanh(self.enc(x[:, 0])).unsqueeze(0)
            return self.head(self.rnn(x, (h0, 2 * h0) if cell is nn.LSTM else h0)[0][:, -1])

    model = Net().eval()
    x = torch.randn(3, 6, 4)
    with _backend.using(backend):
        omega = mk.MAS(model, importance="global").estimate([x]).consolidate().omega
    expected = ref.global_exact(model, [x])
    for name, e in expected.items():
        torch.testing.assert_close(omega[name].double(), e, atol=1e-6 * e.abs().max().item(), rtol=1e-4,
                                   msg=lambda s: f"{name}: {s}")
