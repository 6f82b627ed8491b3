"""Exact and local importance, layer by layer and on whole real models, against the one-sample oracle.

``tests/reference.py`` computes ``(1/N) sum_k |d ||F(x_k)||^2 / d theta|`` by
running the model on one sample at a time (a batch of one), in eval mode; the
local oracle (``local_hebbian``) reads each layer's input and output from
forward hooks and applies the documented formulas in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mas_kernels as mk
from bench.harness import peak_memory
from tests import models
from tests import reference as ref
from tests.helpers import HYPOTHESIS

TOL = dict(atol=1e-6, rtol=2e-5)


def close(got: dict, expected: dict, names=None, tol=TOL):
    """Each parameter on its own scale, floored at 1e-4 of the model's largest importance: a parameter whose
    true importance is 0 (a key bias: softmax ignores a per-query shift) holds only float32 round-off
    (~1e-10 here) in both the oracle and the wrapper, which agree on the model's scale, not on their own."""
    names = list(expected) if names is None else names
    top = max(expected[n].double().abs().max().item() for n in expected)
    for name in names:
        e = expected[name].double()
        scale = max(e.abs().max().item(), 1e-4 * top) or 1.0
        torch.testing.assert_close(got[name].double() / scale, e / scale, **tol, msg=lambda m: f"{name}: {m}")


def no_missing(got: dict, expected: dict):
    """Every parameter whose oracle importance is non-zero has non-zero importance (the MHA out_proj bug)."""
    missing = [n for n in expected if expected[n].abs().sum() > 0 and got[n].abs().sum() == 0]
    assert not missing, f"zero importance for {missing}"


def exact(model, batches, output_fn=lambda o: o, dim=0, **kw):
    mas = mk.MAS(model, importance="global", output_fn=output_fn, **kw).estimate(batches).consolidate()
    expected = ref.global_exact(model, batches if isinstance(batches[0], dict) else [torch.cat(batches, dim)],
                                output_fn, dim=dim)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
    return mas


class Seq(nn.Module):
    """``head(act(layer(x)))``: one layer under test followed by a fixed nonlinear readout."""

    def __init__(self, layer: nn.Module, d_out: int, flatten: bool = False):
        super().__init__()
        self.layer = layer
        self.flatten = flatten
        self.head = nn.LazyLinear(3)
        self.d_out = d_out

    def forward(self, x):
        h = torch.tanh(self.layer(x))
        return self.head(h.flatten(1) if self.flatten else h)


def built(model: nn.Module, x) -> nn.Module:
    with torch.no_grad():
        model(x)  # materializes the LazyLinear
    return models.randomize_norms(model)


# ------------------------------------------------------------- layer by layer
@settings(max_examples=12, **HYPOTHESIS)
@given(n=st.integers(1, 5), t=st.integers(1, 6), i=st.integers(1, 7), j=st.integers(1, 7),
       bias=st.booleans(), split=st.integers(1, 5))
def test_linear_on_sequences(n, t, i, j, bias, split):
    x = torch.randn(n, t, i)
    model = built(Seq(nn.Linear(i, j, bias=bias), j), x)
    exact(model, [x[k:k + split] for k in range(0, n, split)])


CONVS = [
    (nn.Conv2d, dict(kernel_size=3)),
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")),
    (nn.Conv2d, dict(kernel_size=(2, 3), dilation=2, padding=(1, 2), padding_mode="circular")),
    (nn.Conv2d, dict(kernel_size=3, padding="same", padding_mode="replicate", bias=False)),
    (nn.Conv2d, dict(kernel_size=3, groups=2, padding=1)),
    (nn.Conv2d, dict(kernel_size=3, groups=4, padding=1)),  # depthwise
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv3d, dict(kernel_size=2, stride=(1, 2, 1), padding=(1, 0, 0))),
]


@pytest.mark.parametrize("cls, kwargs", CONVS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONVS)])
def test_conv(cls, kwargs):
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cls]
    x = torch.randn(4, 4, *([7] * nd))
    model = built(Seq(cls(4, 4, **kwargs), 4, flatten=True), x)
    exact(model, [x[:3], x[3:]])


@pytest.mark.parametrize("kwargs", [dict(), dict(padding_idx=2), dict(scale_grad_by_freq=True),
                                    dict(padding_idx=0, scale_grad_by_freq=True)])
def test_embedding(kwargs):
    tokens = torch.randint(0, 9, (5, 6))
    tokens[0, :3] = 2  # repeats (scale_grad_by_freq) and padding
    model = built(Seq(nn.Embedding(9, 4, **kwargs), 4), tokens)
    exact(model, [tokens[:2], tokens[2:]])


NORMS = [
    ("layernorm", lambda: nn.LayerNorm(6), (5, 3, 6)),
    ("layernorm-2d", lambda: nn.LayerNorm((3, 6)), (5, 3, 6)),
    ("groupnorm", lambda: nn.GroupNorm(2, 6), (5, 6, 4)),
    ("batchnorm1d", lambda: nn.BatchNorm1d(6), (5, 6)),
    ("batchnorm2d", lambda: nn.BatchNorm2d(6), (5, 6, 3, 3)),
    ("rmsnorm", lambda: nn.RMSNorm(6), (5, 3, 6)),
]


@pytest.mark.parametrize("name, make, shape", NORMS, ids=[n for n, _, _ in NORMS])
def test_norms(name, make, shape):
    x = torch.randn(*shape)
    model = built(Seq(make(), 6, flatten=len(shape) > 3), x)
    exact(model, [x[:2], x[2:]])


class Attention(nn.Module):
    def __init__(self, batch_first: bool, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask=None):
        return self.head(self.mha(x, x, x, key_padding_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw", [dict(), dict(add_bias_kv=True), dict(bias=False)])
def test_multihead_attention(batch_first, kw):
    model = Attention(batch_first, **kw).eval()
    x = torch.randn(3, 4, 8) if batch_first else torch.randn(4, 3, 8)
    mas = exact(model, [x], dim=0 if batch_first else 1)
    assert mas.omega["mha.out_proj.weight"].abs().sum() > 0  # MHA never calls out_proj: once silently zero


def test_multihead_attention_key_padding_mask():
    model = Attention(True).eval()
    x = torch.randn(3, 5, 8)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    mas = mk.MAS(model, importance="global", forward=lambda m, b: m(b[0], mask=b[1])).estimate([(x, mask)])
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for k in range(3):
        out = model(x[k:k + 1], mask[k:k + 1])
        gs = torch.autograd.grad(out.double().pow(2).sum(), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            expected[n] += g.double().abs() / 3
    close(mas.consolidate().omega, expected)


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(num_layers=2, bidirectional=True),
                                dict(batch_first=True, bias=False, num_layers=2)])
def test_rnns(cell, kw):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(4, 5, **kw)
            self.head = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 3)

        def forward(self, x):
            out, state = self.rnn(x)
            h = state[0] if isinstance(state, tuple) else state
            return self.head(out) .sum(1 if kw.get("batch_first") else 0) + h.sum(0).sum(1, keepdim=True)

    model = Net().eval()
    dim = 0 if kw.get("batch_first") else 1
    x = torch.randn(3, 6, 4) if dim == 0 else torch.randn(6, 3, 4)
    exact(model, [x.narrow(dim, 0, 2), x.narrow(dim, 2, 1)], dim=dim)


def test_transformers_conv1d_and_a_parameter_read_by_its_owner():
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(5, 4)  # (nx=4 -> nf=5), weight (4, 5)
            self.scale = nn.Parameter(torch.rand(5) + 0.5)  # read directly in forward: the generic rule
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(x) * self.scale))

    model = Net()
    with torch.no_grad():
        model.proj.weight.normal_()
    exact(model, [torch.randn(3, 4, 4)])


# ------------------------------------------------------------- whole models
def test_resnet_style_cnn_with_batchnorm_and_inplace_relu():
    model = models.randomize_norms(models.ResNetish())
    x = torch.randn(5, 3, 8, 8)
    exact(model, [x[:3], x[3:]])


@pytest.mark.parametrize("inplace", [nn.ReLU(inplace=True), nn.Hardswish(inplace=True)])
def test_linear_followed_by_an_inplace_activation(inplace):
    # The fast path once took the gradient w.r.t. the Linear's output after the in-place op overwrote it.
    model = nn.Sequential(nn.Linear(6, 5), inplace, nn.Linear(5, 3))
    exact(model, [torch.randn(7, 6)])


def test_gpt2_tied_embedding_and_attention_mask():
    model = models.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 40, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[3, :2] = 0
    exact(model, [{"input_ids": ids, "attention_mask": mask}], output_fn=lambda o: o.logits)


def test_bert_with_attention_mask():
    model = models.bert()
    ids = torch.randint(0, 40, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    exact(model, [{"input_ids": ids, "attention_mask": mask}], output_fn=lambda o: o.last_hidden_state)


def test_vit():
    model = models.vit()
    exact(model, [{"pixel_values": torch.randn(3, 3, 8, 8)}], output_fn=lambda o: o.last_hidden_state)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first):
    model = models.randomize_norms(models.Encoder(batch_first))
    # T == N == 3 in the (T, N, E) layout: sizes alone cannot tell the sample dim
    x = torch.randn(3, 3, 8) if not batch_first else torch.randn(3, 5, 8)
    exact(model, [x], dim=0 if batch_first else 1)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_text_rnn(cell):
    model = models.TextLSTM(cell=cell).eval()
    tokens = torch.randint(0, 11, (4, 7))
    tokens[0, :2] = 0
    exact(model, [tokens[:2], tokens[2:]])


def test_tied_weights_and_a_module_called_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(self.a(x))))

    exact(Tied(), [torch.randn(6, 4)])


def test_a_parameter_used_outside_its_layer_still_gets_its_exact_importance():
    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 5)  # never called: its weight is read directly below
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(torch.tanh(F.linear(x, self.inner.weight, self.inner.bias)))

    model = Stray()
    with pytest.warns(RuntimeWarning, match=r"inner.weight.*one backward pass per sample.*used outside the layers"):
        exact(model, [torch.randn(6, 4)])


def test_two_embeddings_sharing_one_table():
    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.src = nn.Embedding(9, 4)
            self.tgt = nn.Embedding(9, 4)
            self.tgt.weight = self.src.weight
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(torch.tanh(self.src(ids) + self.tgt(ids.flip(1))))

    tokens = torch.randint(0, 9, (5, 6))
    exact(TwoTables(), [tokens[:3], tokens[3:]])


def test_unbatched_inputs_count_one_sample_each():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    xs = [torch.randn(6) for _ in range(4)]
    mas = mk.MAS(model, importance="global")
    with mas.accumulating():
        for x in xs:
            model(x)
    assert mas.num_samples == 4
    close(mas.consolidate().omega, ref.global_exact(model, [torch.stack(xs)]))
    conv = nn.Conv2d(3, 2, 3)
    m2 = mk.MAS(conv, importance="local").estimate([torch.randn(3, 5, 5)])
    assert m2.num_samples == 1


def test_estimate_refuses_a_bare_tensor():
    with pytest.raises(TypeError, match="iterable of batches"):
        mk.MAS(nn.Linear(6, 2)).estimate(torch.randn(5, 6))


def test_train_mode_with_batchnorm_is_refused_before_anything_changes():
    model = models.randomize_norms(models.ResNetish())
    stats = {n: b.clone() for n, b in model.named_buffers()}
    mas = mk.MAS(model, importance="global")
    with pytest.raises(ValueError, match=r"BatchNorm layer 'stem.1'.*train_mode=False"):
        mas.estimate([torch.randn(4, 3, 8, 8)], train_mode=True)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert mas.num_samples == 0
    # global_batch has no per-sample gradient to define: it runs in train mode
    mk.MAS(model, importance="global_batch").estimate([torch.randn(4, 3, 8, 8)], train_mode=True)


@pytest.mark.slow
def test_accumulating_around_a_compiled_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 6)
    mas = mk.MAS(compiled, importance="global")
    with mas.accumulating():
        compiled(x)
    assert mas.num_samples == 8
    close(mas.consolidate().omega, ref.global_exact(model, [x]))


def test_two_wrappers_on_one_model_count_only_the_users_forwards():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    a, b = mk.MAS(model, importance="local"), mk.MAS(model, importance="global")
    c = mk.MAS(model, importance="global")
    with a.accumulating(), b.accumulating(), c.accumulating():
        model(x)
    assert a.num_samples == b.num_samples == c.num_samples == 4
    close(b.consolidate().omega, ref.global_exact(model, [x]))
    close(c.consolidate().omega, ref.global_exact(model, [x]))


def test_a_deepcopy_of_the_model_inside_accumulating_takes_no_hooks_along():
    import copy

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    mas = mk.MAS(model, importance="local")
    with mas.accumulating():
        twin = copy.deepcopy(model)
        twin(torch.randn(3, 6))  # not the wrapper's model: not counted
        assert mas.num_samples == 0
    twin(torch.randn(3, 6))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())
    assert mas.num_samples == 0


# ------------------------------------------------------------------ local rule
LOCAL_MODELS = [
    ("resnet", lambda: models.randomize_norms(models.ResNetish()), lambda: [torch.randn(3, 3, 8, 8)]),
    ("gpt2", models.gpt2, lambda: [{"input_ids": torch.randint(0, 40, (3, 6))}]),
    ("bert", models.bert, lambda: [{"input_ids": torch.randint(0, 40, (3, 6))}]),
    ("vit", models.vit, lambda: [{"pixel_values": torch.randn(2, 3, 8, 8)}]),
    ("encoder", lambda: models.randomize_norms(models.Encoder(True)), lambda: [torch.randn(3, 4, 8)]),
    ("lstm", lambda: models.TextLSTM().eval(), lambda: [torch.randint(0, 11, (3, 5))]),
    ("gru-bi", lambda: models.TextLSTM(cell=nn.GRU, bidirectional=True).eval(), lambda: [torch.randint(0, 11, (3, 5))]),
]


@pytest.mark.parametrize("name, make, data", LOCAL_MODELS, ids=[n for n, _, _ in LOCAL_MODELS])
def test_local_rule_on_whole_models_covers_everything(name, make, data):
    model, batches = make(), data()
    mas = mk.MAS(model, importance="local", uncovered="error")
    assert mas.uncovered == []
    mas.estimate(batches).consolidate()
    n = sum((next(iter(b.values())) if isinstance(b, dict) else b).shape[0] for b in batches)
    expected = ref.local_hebbian(model, batches, n)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU, lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k)],
                         ids=["rnn", "lstm", "gru", "rnn-relu"])
@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(num_layers=3, bidirectional=True),
                                dict(batch_first=True, bias=False, num_layers=2, bidirectional=True)])
@pytest.mark.slow
def test_local_rule_on_rnns(cell, kw):
    """The local rule's fused path (each layer through the fused kernel, h_{t-1} from its output
    shifted) against the oracle's written-out cell, every layer and direction."""
    rnn = cell(4, 5, **kw).eval()
    x = torch.randn(3, 6, 4) if kw.get("batch_first") else torch.randn(6, 3, 4)
    mas = mk.MAS(rnn, importance="local", uncovered="error")
    mas.estimate([x]).consolidate()
    expected = ref.local_hebbian(rnn, [x], 3)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
    # with an initial state: h_{t-1} at the first step (the last, reversed) is the given one
    h0 = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 3, 5)
    hx = (h0, torch.randn_like(h0)) if rnn.mode == "LSTM" else h0

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x, hx)[0]

    model = WithState()
    mas = mk.MAS(model, importance="local", uncovered="error").estimate([x]).consolidate()
    close(mas.omega, ref.local_hebbian(model, [x], 3))


def test_local_rule_triton_backend(backend):
    model = models.randomize_norms(models.ResNetish())
    x = torch.randn(2, 3, 8, 8)
    mas = mk.MAS(model, importance="local").estimate([x]).consolidate()
    close(mas.omega, ref.local_hebbian(model, [x], 2), tol=dict(atol=1e-5, rtol=1e-4))


def test_exact_rule_every_backend(backend):
    model = models.TextLSTM().eval()
    tokens = torch.randint(0, 11, (3, 5))
    mas = mk.MAS(model, importance="global").estimate([tokens]).consolidate()
    close(mas.omega, ref.global_exact(model, [tokens]), tol=dict(atol=1e-5, rtol=1e-4))


# ------------------------------------------------------------------ memory
def test_exact_rule_scratch_stays_within_the_memory_budget(monkeypatch):
    """Per-sample scratch of the conv rule (patches, per-sample gradients) within ``memory_budget`` (the unfold
    strategy, whose patches are measured here; tests/test_conv_exact.py checks every strategy's peak)."""
    from mas_kernels.estimators.rules import conv_exact

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 2)).eval()
    x = torch.randn(16, 3, 8, 8)
    biggest = []
    real = conv_exact.unfolded
    monkeypatch.setattr(conv_exact, "CROSSOVER", (dict(strategy="unfold"),))
    monkeypatch.setattr(conv_exact, "unfolded", lambda m, t: biggest.append(real(m, t).numel() * 4) or real(m, t))
    budget = 64 << 10
    mas = mk.MAS(model, importance="global", memory_budget=budget).estimate([x]).consolidate()
    assert biggest and max(biggest) <= budget
    close(mas.omega, ref.global_exact(model, [x]))


def test_exact_rule_peak_memory_stays_within_the_budget_over_a_plain_backward():
    """The whole exact pass, measured: its peak over a plain forward+backward is at most the budget (the conv
    rule's patches and per-sample products) plus what the recorded calls keep alive until the rules run (each
    layer's output and its gradient, which a plain backward frees as it goes) and the accumulator/staging swap."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 16 * 16, 4)).eval()
    x = torch.randn(32, 3, 16, 16)

    def plain():
        torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))

    budget = 1 << 20
    mas = mk.MAS(model, importance="global", memory_budget=budget)
    mas.estimate([x])  # allocates the accumulator and staging (held across batches)
    base = peak_memory(plain)
    peak = peak_memory(lambda: mas.estimate([x]))
    params = 4 * sum(p.numel() for p in model.parameters())
    recorded = 2 * 2 * 4 * 32 * 16 * 16 * 16  # the two convs' outputs and output gradients
    assert peak - base <= budget + 2 * params + recorded, (peak, base)
    # and without the budget the conv patches alone would exceed it
    assert 4 * 32 * 16 * 16 * 16 * 9 > budget


# ------------------------------------------------------------------ user rules
class Scale(nn.Module):
    """y = x * w, a layer type of the user's own."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


class ScaleRule(mk.Rule):
    attrs = ("weight",)

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        total = 0
        for call in calls:
            total = total + (call.delta.float() * call.x.float())[lo:hi]
        return {"weight": total}

    def local(self, layer, call, accs):
        accs["weight"].add_((call.output.abs() * call.x.abs()).sum(0))


def test_register_rule_serves_a_users_layer_and_refuses_an_incomplete_rule():
    mk.register_rule(Scale, ScaleRule())
    try:
        model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 2))
        assert mk.MAS(model, importance="global", uncovered="error").uncovered == []
        exact(model, [torch.randn(6, 4)])
    finally:
        from mas_kernels.estimators.rules.base import _RULES
        _RULES.pop(Scale, None)

    class NoLocal(mk.Rule):
        def per_sample(self, layer, calls, ctx, attrs, lo, hi):
            return {}

    with pytest.raises(TypeError, match="NoLocal has no local"):
        mk.register_rule(Scale, NoLocal())
    with pytest.raises(TypeError, match="neither exact"):
        mk.register_rule(Scale, type("Empty", (mk.Rule,), {"local_supported": False})())
