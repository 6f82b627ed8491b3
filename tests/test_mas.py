"""The MAS wrapper against the oracle in tests/reference.py (per-sample autograd loops)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import mas_kernels as mk
from tests import reference as ref

TOL = dict(atol=1e-5, rtol=1e-4)


def close(omega: dict, expected: dict, **tol):
    tol = tol or TOL
    assert set(omega) == set(expected)
    for name in expected:
        torch.testing.assert_close(omega[name].double(), expected[name].double(), **tol, msg=lambda m: f"{name}: {m}")


def mlp(d_in=6, hidden=5, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class ConvNet(nn.Module):
    """Conv (reflect padding, stride, groups), BatchNorm (eval), LayerNorm, Linear on 2-D."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.out(self.ln(self.fc(h.flatten(1))))


class SeqNet(nn.Module):
    """Embedding + Linear on (N, T, D) inputs: positions summed within a sample."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.lin(self.emb(tokens))


def split(x, size):
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


# ---------------------------------------------------------------- global exact
@pytest.mark.parametrize("batch", [1, 7, 11])
def test_global_exact_mlp_any_batch_size(backend, batch):
    model = mlp()
    x = torch.randn(11, 6)
    mas = mk.MAS(model, importance="global").estimate(split(x, batch)).consolidate()
    close(mas.omega, ref.global_exact(model, [x]))
    assert mas.samples_consolidated == 11


@pytest.mark.parametrize("batch", [1, 7, 9])
def test_global_exact_conv_norms(batch):
    model = ConvNet().eval()
    x = torch.randn(9, 2, 6, 6)
    mas = mk.MAS(model, importance="global", chunk_size=4).estimate(split(x, batch)).consolidate()
    close(mas.omega, ref.global_exact(model, [x]))


def test_global_exact_sequence_and_embedding(backend):
    model = SeqNet()
    tokens = torch.randint(0, 7, (8, 5))
    mas = mk.MAS(model, importance="global").estimate(split(tokens, 3)).consolidate()
    close(mas.omega, ref.global_exact(model, [tokens]))


def test_global_exact_differs_from_batch_convention():
    model = mlp()
    x = torch.randn(16, 6)
    exact = mk.MAS(model, importance="global").estimate([x]).consolidate()
    batch = mk.MAS(model, importance="global_batch").estimate([x]).consolidate()
    # |sum g_k| <= sum |g_k| elementwise, strictly somewhere for a real batch.
    for name in exact.omega:
        assert (batch.omega[name] <= exact.omega[name] + 1e-6).all()
    assert any((batch.omega[n] < exact.omega[n] - 1e-4).any() for n in exact.omega)


def test_global_batch_convention(backend):
    model = ConvNet().eval()
    x = torch.randn(10, 2, 6, 6)
    batches = split(x, 4)
    mas = mk.MAS(model, importance="global_batch").estimate(batches).consolidate()
    close(mas.omega, ref.global_batch(model, batches))


def test_global_batch_avalanche_normalization_on_ragged_batches(backend):
    model = mlp()
    x = torch.randn(11, 6)
    batches = split(x, 4)  # 4, 4, 3: the short last batch is where the two normalizations differ
    avalanche = mk.MAS(model, importance="global_batch", normalization="avalanche").estimate(batches).consolidate()
    close(avalanche.omega, ref.global_batch_avalanche(model, batches))
    samples = mk.MAS(model, importance="global_batch").estimate(batches).consolidate()
    assert any(not torch.allclose(avalanche.omega[n], samples.omega[n], rtol=1e-3) for n in samples.omega)
    assert avalanche.samples_consolidated == 11
    with pytest.raises(ValueError, match="normalization"):
        mk.MAS(model, normalization="batches")


def test_output_fn_picks_tensor():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return {"logits": self.net(x), "aux": x.sum()}

    model = Two()
    x = torch.randn(5, 6)
    with pytest.raises(TypeError, match="output_fn"):
        mk.MAS(model, importance="global").estimate([x])
    mas = mk.MAS(model, importance="global", output_fn=lambda o: o["logits"]).estimate([x]).consolidate()
    close(mas.omega, ref.global_exact(model, [x], output_fn=lambda o: o["logits"]))


# ----------------------------------------------------------------------- local
def test_local_linear(backend):
    model = mlp()
    x = torch.randn(9, 6)
    mas = mk.MAS(model, importance="local").estimate(split(x, 4)).consolidate()
    h = model[0](x)
    w0, b0 = ref.local_linear(x, h)
    w2, b2 = ref.local_linear(torch.relu(h), model[2](torch.relu(h)))
    close(mas.omega, {"0.weight": w0 / 9, "0.bias": b0 / 9, "2.weight": w2 / 9, "2.bias": b2 / 9})
    assert mas.uncovered == []


def test_local_sequence_positions_summed_within_sample():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 7, 4)  # N=5 samples of 7 positions
    mas = mk.MAS(lin, importance="local").estimate([x]).consolidate()
    w, b = ref.local_linear(x, lin(x))
    close(mas.omega, {"weight": w / 5, "bias": b / 5})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), dilation=2, padding=(1, 2)),
        dict(kernel_size=3, padding="same", padding_mode="circular"),
        dict(kernel_size=3, groups=2, padding=1, padding_mode="replicate", bias=False),
    ],
)
def test_local_conv2d(kwargs):
    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.randn(3, 4, 9, 8)
    mas = mk.MAS(conv, importance="local").estimate([x]).consolidate()
    w, b = ref.local_conv2d(conv, x, conv(x))
    expected = {"weight": w / 3}
    if conv.bias is not None:
        expected["bias"] = b / 3
    close(mas.omega, expected)


def test_local_conv1d_and_3d_match_conv2d_reference():
    # Conv1d is a Conv2d of height 1; Conv3d of depth 1 likewise.
    c1 = nn.Conv1d(3, 4, 3, stride=2, padding=1)
    c2 = nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding=(0, 1))
    c2.weight.data.copy_(c1.weight.data.unsqueeze(2))
    c2.bias.data.copy_(c1.bias.data)
    x = torch.randn(2, 3, 10)
    m1 = mk.MAS(c1, importance="local").estimate([x]).consolidate()
    w, b = ref.local_conv2d(c2, x.unsqueeze(2), c2(x.unsqueeze(2)))
    close(m1.omega, {"weight": w.squeeze(2) / 2, "bias": b / 2})

    c3 = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    c2b = nn.Conv2d(3, 4, 3, padding=1)
    c2b.weight.data.copy_(c3.weight.data.squeeze(2))
    c2b.bias.data.copy_(c3.bias.data)
    x3 = torch.randn(2, 3, 1, 5, 5)
    m3 = mk.MAS(c3, importance="local").estimate([x3]).consolidate()
    w, b = ref.local_conv2d(c2b, x3.squeeze(2), c2b(x3.squeeze(2)))
    close(m3.omega, {"weight": w.unsqueeze(2) / 2, "bias": b / 2})


def test_local_post_activation():
    model = mlp()
    x = torch.randn(6, 6)
    mas = mk.MAS(model, importance="local", post_activation={"0": torch.relu}).estimate([x]).consolidate()
    h = model[0](x)
    w0, b0 = ref.local_linear(x, torch.relu(h))
    close({k: mas.omega[k] for k in ("0.weight", "0.bias")}, {"0.weight": w0 / 6, "0.bias": b0 / 6})
    w2, _ = ref.local_linear(torch.relu(h), model[2](torch.relu(h)))
    close({"2.weight": mas.omega["2.weight"]}, {"2.weight": w2 / 6})


class Scaled(nn.Module):
    """A layer with a raw parameter and no rule of its own: y = x * s."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.s


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.sc = Scaled(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.sc(self.fc(x))))


def test_local_norms_match_reference():
    model = ConvNet().eval()
    x = torch.randn(5, 2, 6, 6)
    mas = mk.MAS(model, importance="local").estimate([x]).consolidate()
    assert mas.uncovered == []
    h_bn = model.c1(x)
    wb, bb = ref.local_norm(model.bn, h_bn)
    h_ln = model.fc(torch.relu(model.c2(torch.relu(model.bn(h_bn)))).flatten(1))
    wl, bl = ref.local_norm(model.ln, h_ln)
    close({n: mas.omega[n] for n in ("bn.weight", "bn.bias", "ln.weight", "ln.bias")},
          {"bn.weight": wb / 5, "bn.bias": bb / 5, "ln.weight": wl / 5, "ln.bias": bl / 5})
    gn = nn.GroupNorm(2, 4)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    xg = torch.randn(3, 4, 5)
    g = mk.MAS(gn, importance="local").estimate([xg]).consolidate()
    wg, bg = ref.local_norm(gn, xg)
    close(g.omega, {"weight": wg / 3, "bias": bg / 3})


def test_local_uncovered_policies():
    model = ScaledNet()
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="sc.s"):
        mk.MAS(model, importance="local", uncovered="error").estimate([x])
    skip = mk.MAS(model, importance="local", uncovered="skip").estimate([x]).consolidate()
    assert skip.uncovered == ["sc.s"]
    assert skip.omega["sc.s"].abs().sum() == 0
    glob = mk.MAS(model, importance="local", uncovered="global").estimate(split(x, 2)).consolidate()
    expected = ref.global_exact(model, [x])
    close({"sc.s": glob.omega["sc.s"]}, {"sc.s": expected["sc.s"]})
    # the covered ones follow the local rule, not the global one
    w, _ = ref.local_linear(x, model.fc(x))
    close({"fc.weight": glob.omega["fc.weight"]}, {"fc.weight": w / 5})


def test_accumulating_online_equals_estimate_local(backend):
    model = mlp()
    x = torch.randn(10, 6)
    a = mk.MAS(model, importance="local").estimate(split(x, 3))
    b = mk.MAS(model, importance="local")
    with torch.no_grad(), b.accumulating():
        for xb in split(x, 3):
            model(xb)
    model(x)  # outside the block: not counted
    assert a.num_samples == b.num_samples == 10
    close(b.consolidate().omega, a.consolidate().omega, atol=1e-6, rtol=1e-6)


def test_accumulating_online_global_restores_training_graph():
    model = mlp()
    x = torch.randn(8, 6)
    mas = mk.MAS(model, importance="global")
    with mas.accumulating():
        out = model(x)
        out.sum().backward()  # the user's own graph still works
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    close(mas.consolidate().omega, ref.global_exact(model, [x]))


def test_estimate_leaves_mode_and_grads():
    model = ConvNet()
    model.train()
    model.bn.eval()
    x = torch.randn(4, 2, 6, 6)
    model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = model.bn.running_mean.clone()
    model.fc.weight.grad = None
    for imp in ("local", "global", "global_batch"):
        mk.MAS(model, importance=imp).estimate([x], progress=True)
        assert model.training and not model.bn.training and model.c1.training
        assert model.fc.weight.grad is None
        for n, p in model.named_parameters():
            if n != "fc.weight":
                assert torch.equal(p.grad, before[n])
        assert torch.equal(model.bn.running_mean, stats)


# ------------------------------------------------------------ across tasks
@pytest.mark.parametrize("combine", ["sum", "mean", 0.3])
def test_combine(combine):
    model = mlp()
    x1, x2 = torch.randn(4, 6), torch.randn(12, 6)
    mas = mk.MAS(model, importance="global", combine=combine)
    mas.estimate([x1]).consolidate()
    mas.estimate([x2]).consolidate()
    o1, o2 = ref.global_exact(model, [x1]), ref.global_exact(model, [x2])
    if combine == "sum":
        expected = {n: o1[n] + o2[n] for n in o1}
    elif combine == "mean":
        expected = {n: (4 * o1[n] + 12 * o2[n]) / 16 for n in o1}
    else:
        expected = {n: 0.3 * o1[n] + 0.7 * o2[n] for n in o1}
    close(mas.omega, expected)
    assert mas.num_tasks == 2 and mas.num_samples == 0 and mas.samples_consolidated == 16


def test_consolidate_snapshots_anchors_and_needs_samples():
    model = mlp()
    mas = mk.MAS(model)
    with pytest.raises(RuntimeError, match="no samples"):
        mas.consolidate()
    mas.estimate([torch.randn(3, 6)]).consolidate()
    for n, p in model.named_parameters():
        assert torch.equal(mas.anchors[n], p.detach())
        assert mas.anchors[n].data_ptr() != p.data_ptr()
    with pytest.raises(RuntimeError, match="no samples"):
        mas.consolidate()


# ----------------------------------------------------------------- penalty
def _explicit_penalty(model, mas, lam):
    return lam * sum((mas.omega[n] * (p - mas.anchors[n]) ** 2).sum() for n, p in model.named_parameters())


def test_penalty_and_grad(backend):
    model = mlp()
    lam = 0.7
    mas = mk.MAS(model, lam=lam, importance="local")
    assert float(mas.penalty()) == 0.0 and float(mas.add_penalty_grad_()) == 0.0
    mas.estimate([torch.randn(5, 6)]).consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = _explicit_penalty(model, mas, lam)
    auto = torch.autograd.grad(expected, list(model.parameters()))

    value = mas.penalty()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(2.0 * value, list(model.parameters()))
    for g, a in zip(got, auto):
        torch.testing.assert_close(g, 2.0 * a, rtol=1e-5, atol=1e-6)

    model.zero_grad(set_to_none=True)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    v2 = mas.add_penalty_grad_()
    torch.testing.assert_close(v2, expected.detach(), rtol=1e-5, atol=1e-6)
    for (n, p), a in zip(model.named_parameters(), auto):
        base = 1.0 if n == "0.weight" else 0.0
        torch.testing.assert_close(p.grad, a + base, rtol=1e-5, atol=1e-6)


def test_new_head_after_consolidate_gets_zero_importance():
    model = mlp()
    mas = mk.MAS(model, importance="global")
    mas.estimate([torch.randn(5, 6)]).consolidate()
    old = {n: t.clone() for n, t in mas.omega.items()}
    model.add_module("head2", nn.Linear(3, 2))
    assert torch.isfinite(mas.penalty())
    assert "head2.weight" in mas.omega and mas.omega["head2.weight"].abs().sum() == 0
    for n, t in old.items():
        assert torch.equal(mas.omega[n], t)
    # Replacing a layer: the penalty follows the new parameter, not the stale one.
    model[2] = nn.Linear(5, 3)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    value = mas.penalty()
    names = dict(model.named_parameters())
    expected = sum((mas.omega[n] * (names[n] - mas.anchors[n]) ** 2).sum() for n in names)
    torch.testing.assert_close(value, expected.detach())
    value.backward()
    assert model[2].weight.grad is not None


def test_frozen_parameters():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 6)
    mas = mk.MAS(model, importance="global")
    assert "0.weight" not in mas.omega
    inc = mk.MAS(model, importance="global", include_frozen=True).estimate([x]).consolidate()
    assert not model[0].weight.requires_grad
    model[0].weight.requires_grad_(True)
    expected = ref.global_exact(model, [x])
    close(inc.omega, expected)


def test_tied_parameters_and_module_called_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied

        def forward(self, x):
            return self.b(torch.tanh(self.a(self.a(x))))  # a called twice

    model = Tied()
    x = torch.randn(6, 4)
    mas = mk.MAS(model, importance="global").estimate(split(x, 4)).consolidate()
    assert list(mas.omega) == ["a.weight", "a.bias", "b.bias"]  # one entry for the tied weight
    close(mas.omega, ref.global_exact(model, [x]))
    # local: a tied weight adds the Hebbian numerators of every use; a's bias sums both calls.
    loc = mk.MAS(model, importance="local", uncovered="error")
    assert loc.uncovered == []
    loc.estimate([x]).consolidate()
    h = model.a(x)
    h2 = model.a(h)
    w1, b1 = ref.local_linear(x, h)
    w2, b2 = ref.local_linear(h, h2)
    w3, _ = ref.local_linear(torch.tanh(h2), model.b(torch.tanh(h2)))
    close({"a.bias": loc.omega["a.bias"], "a.weight": loc.omega["a.weight"]},
          {"a.bias": (b1 + b2) / 6, "a.weight": (w1 + w2 + w3) / 6})


def test_two_wrappers_on_one_model_are_independent():
    model = mlp()
    x = torch.randn(5, 6)
    a = mk.MAS(model, importance="local")
    b = mk.MAS(model, importance="global")
    with a.accumulating():
        model(x)
    assert a.num_samples == 5 and b.num_samples == 0
    a.consolidate()
    b.estimate([x]).consolidate()
    close(b.omega, ref.global_exact(model, [x]))


def test_wrapper_names_strip_prefixes():
    model = mlp()
    compiled = torch.compile(model)
    dp = nn.DataParallel(model)
    for wrapped in (compiled, dp):
        mas = mk.MAS(wrapped)
        assert list(mas.omega) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_hooks_removed():
    model = mlp()
    mas = mk.MAS(model)
    with mas.accumulating():
        assert model._forward_hooks and model[0]._forward_hooks
    assert not model._forward_hooks and not model[0]._forward_hooks
    with mas.accumulating():
        mas.remove()
        assert not model._forward_hooks and not model[0]._forward_hooks

    # garbage collection of a wrapper (even mid-session) leaves no hooks behind
    def leak():
        m = mk.MAS(model)
        cm = m.accumulating()
        cm.__enter__()
        assert model._forward_hooks

    leak()
    gc.collect()
    assert not model._forward_hooks and not model[0]._forward_hooks


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("importance", ["local", "global", "global_batch"])
def test_non_finite_batch_rejected_whole(importance):
    model = mlp()
    mas = mk.MAS(model, importance=importance)
    mas.estimate([torch.randn(4, 6)])
    acc = mas.state_dict()["accumulator"]
    bad = torch.randn(3, 6)
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="'0'"):
        mas.estimate([bad])
    assert mas.num_samples == 4
    for n, t in mas.state_dict()["accumulator"].items():
        assert torch.equal(t, acc[n])
    mas.consolidate()
    assert all(torch.isfinite(t).all() for t in mas.omega.values())


def test_constructor_errors():
    with pytest.raises(ValueError, match="importance"):
        mk.MAS(mlp(), importance="hebbian")
    with pytest.raises(ValueError, match="combine"):
        mk.MAS(mlp(), combine="max")
    with pytest.raises(ValueError, match="alpha"):
        mk.MAS(mlp(), combine=1.5)
    with pytest.raises(TypeError, match="nn.Module"):
        mk.MAS(lambda x: x)


# ------------------------------------------------------------------- state
def _trained(importance="global"):
    model = mlp()
    mas = mk.MAS(model, lam=2.0, importance=importance)
    mas.estimate([torch.randn(5, 6)]).consolidate()
    mas.estimate([torch.randn(3, 6)])  # an open accumulator is state too
    return model, mas


def test_save_load_round_trip_bit_exact(tmp_path):
    model, mas = _trained()
    path = tmp_path / "mas.safetensors"
    mas.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["mas.safetensors"]  # no temp file left
    other = mk.MAS(model, importance="global")
    other.load(path)
    for part in ("omega", "anchors", "accumulator"):
        for n, t in mas.state_dict()[part].items():
            assert torch.equal(other.state_dict()[part][n], t)
    assert (other.num_samples, other.samples_consolidated, other.num_tasks) == (3, 5, 1)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert {"importance", "combine", "lam", "num_samples", "version"} <= set(meta)

    sd = mas.state_dict()
    third = mk.MAS(model, importance="global")
    third.load_state_dict(sd)
    assert torch.equal(third.omega["0.weight"], mas.omega["0.weight"])


def test_load_rejects_mismatch_without_change(tmp_path):
    model, mas = _trained()
    path = tmp_path / "mas.safetensors"
    mas.save(path)
    other_model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    other = mk.MAS(other_model, importance="global")
    other.estimate([torch.randn(2, 6)])
    before = {n: t.clone() for n, t in other.state_dict()["accumulator"].items()}
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        other.load(path)
    for n, t in other.state_dict()["accumulator"].items():
        assert torch.equal(t, before[n])
    assert other.num_samples == 2

    renamed = mk.MAS(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Identity(), nn.Linear(5, 3)))
    with pytest.raises(ValueError, match="3.weight|2.weight"):
        renamed.load(path)


def test_load_corrupt_or_truncated(tmp_path):
    model, mas = _trained()
    path = tmp_path / "mas.safetensors"
    mas.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    other = mk.MAS(model, importance="global")
    for name in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match="safetensors"):
            other.load(tmp_path / name)
    assert other.num_tasks == 0 and all(t.abs().sum() == 0 for t in other.omega.values())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not written by"):
        other.load(tmp_path / "foreign.safetensors")


@pytest.mark.slow
def test_torch_compile_training_step_with_wrapper():
    model = mlp()
    mas = mk.MAS(model, lam=0.5, importance="local")
    mas.estimate([torch.randn(8, 6)]).consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def loss_fn(x, y):
        return nn.functional.mse_loss(model(x), y) + mas.penalty()

    eager = loss_fn(x, y)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for g, p in zip(g_eager, model.parameters()):
        torch.testing.assert_close(p.grad, g)

    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    value = torch.compile(mas.add_penalty_grad_, backend="aot_eager", fullgraph=True)()
    torch.testing.assert_close(value, eager - nn.functional.mse_loss(model(x), y))
    for g, p in zip(g_eager, model.parameters()):
        torch.testing.assert_close(p.grad, g)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 9), hidden=st.integers(1, 9), d_out=st.integers(1, 4),
    n=st.integers(1, 13), batch=st.integers(1, 13),
    importance=st.sampled_from(["local", "global", "global_batch"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_mlps_any_partition(d_in, hidden, d_out, n, batch, importance, dtype):
    torch.manual_seed(n * 31 + batch)
    model = mlp(d_in, hidden, d_out).to(dtype)
    x = torch.randn(n, d_in, dtype=dtype)
    batches = split(x, batch)
    mas = mk.MAS(model, importance=importance).estimate(batches).consolidate()
    assert all(t.dtype == torch.float32 for t in mas.omega.values())
    tol = TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    if importance == "global":
        expected = ref.global_exact(model, [x])
    elif importance == "global_batch":
        expected = ref.global_batch(model, batches)
    else:
        h = model[0](x)
        w0, b0 = ref.local_linear(x, h)
        w2, b2 = ref.local_linear(torch.relu(h), model[2](torch.relu(h)))
        expected = {"0.weight": w0 / n, "0.bias": b0 / n, "2.weight": w2 / n, "2.bias": b2 / n}
    close(mas.omega, expected, **tol)


def test_accumulating_under_no_grad_and_train_mode_norms():
    """Online accumulation inside a user's no_grad / train-mode loop, for every rule."""
    model = ConvNet()
    model.train()
    x = torch.randn(6, 2, 6, 6)
    stats = model.bn.running_mean.clone()
    for imp in ("global_batch", "global", "local"):
        mas = mk.MAS(model, importance=imp)
        with torch.no_grad(), mas.accumulating():
            model.eval()
            model(x)
            model.train()
        assert mas.num_samples == 6 and model.training
        assert all(torch.isfinite(t).all() for t in mas.consolidate().omega.values())
    # local's BatchNorm rule sees what the layer normalized with: batch statistics while the user trains
    mas = mk.MAS(model, importance="local")
    assert torch.equal(model.bn.running_mean, stats)  # the global rules' passes ran in eval mode
    with torch.no_grad(), mas.accumulating():
        model(x)
    assert not torch.equal(model.bn.running_mean, stats)  # the user's own train-mode forward updates stats
    wb, bb = ref.local_norm(model.bn.train(), model.c1(x))
    close({"bn.weight": mas.consolidate().omega["bn.weight"], "bn.bias": mas.omega["bn.bias"]},
          {"bn.weight": wb / 6, "bn.bias": bb / 6})
