"""The exact rule's per-layer rules run inside the backward (``Rule.eager``: convolutions and channel norms called
once, as soon as their output gradient is complete), against the one-sample oracle and against the same pass
with every rule after the backward; and what it is for, the peak memory of the pass."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import mas_kernels as mk
from bench.harness import peak_memory
from mas_kernels.estimators import global_exact
from tests import models
from tests import reference as ref
from tests.test_exact_layers import close


def _eager_layers(monkeypatch) -> list:
    """The layer names each pass ran inside the backward (one list per pass)."""
    seen = []
    real = global_exact.ExactEstimator._eager

    def spy(self, layers, layout, fast):
        got = real(self, layers, layout, fast)
        seen.append(sorted(layer.name for layer in got.values()))
        return got

    monkeypatch.setattr(global_exact.ExactEstimator, "_eager", spy)
    return seen


class Twice(nn.Module):
    """One convolution called twice (its rule sums both calls per sample: not eager), a norm called once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.head = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(torch.relu(self.conv(x)))).flatten(1))


class Unused(nn.Module):
    """A convolution whose output never reaches the loss (no output gradient: its hook never fires)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Conv1d(2, 4, 3, dilation=2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.b(x)
        return torch.tanh(self.bn(self.a(x)))


class Towers(nn.Module):
    """Two convolution towers side by side (neither below the other: each tower's lowest output gradient is
    asked for), and a Linear between two convolutions (the lower one below the Linear's asked-for output)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 2, 3, stride=2)
        self.mid = nn.Linear(4 * 6 * 6, 4 * 6 * 6)
        self.c = nn.Conv2d(4, 2, 3)
        self.head = nn.Linear(2 * 4 * 4 + 2 * 2 * 2, 3)

    def forward(self, x):
        a = torch.relu(self.bn(self.a(x)))
        a = self.c(torch.tanh(self.mid(a.flatten(1))).view(-1, 4, 6, 6))
        b = torch.relu(self.b(x))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


CASES = {
    "towers": (lambda: models.randomize_norms(Towers()), (3, 3, 6, 6)),
    "resnetish": (lambda: models.randomize_norms(models.ResNetish()), (5, 3, 8, 8)),
    "conv3d_bn": (lambda: models.randomize_norms(nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1), nn.BatchNorm3d(4), nn.ReLU(inplace=True),
        nn.Conv3d(4, 3, (2, 3, 3), dilation=(1, 2, 1), padding="same", padding_mode="reflect"))), (3, 2, 5, 6, 7)),
    "twice": (Twice, (4, 3, 6, 6)),
    "unused": (lambda: models.randomize_norms(Unused()), (3, 2, 9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rules_inside_the_backward_match_the_oracle(name, monkeypatch):
    make, shape = CASES[name]
    model = make().eval()
    xs = [torch.randn(shape), torch.randn(shape)]
    seen = _eager_layers(monkeypatch)
    mas = mk.MAS(model, importance="global", verify=False).estimate(xs).consolidate()
    close(mas.omega, ref.global_exact(model, [torch.cat(xs)]))
    assert seen and all(seen), seen  # some layers did run inside the backward
    if name == "twice":
        assert seen[0] == ["norm"], seen  # the convolution called twice waits for the backward to end
    # the same numbers as every rule after the backward
    monkeypatch.setattr(global_exact.ExactEstimator, "_eager", lambda self, *a: {})
    after = mk.MAS(model, importance="global", verify=False).estimate(xs).consolidate()
    for k, v in after.omega.items():
        torch.testing.assert_close(mas.omega[k], v, rtol=1e-6, atol=0, msg=k)


def test_the_self_checked_batch_runs_every_rule_after_the_backward(monkeypatch):
    model = models.randomize_norms(models.ResNetish()).eval()
    seen = _eager_layers(monkeypatch)
    x = torch.randn(4, 3, 8, 8)
    mk.MAS(model, importance="global").estimate([x, x])  # the first batch self-checked, the second not
    assert len(seen) == 1 and seen[0], seen  # only the second batch's pass ran rules inside its backward


def test_rules_inside_the_backward_cut_the_peak_memory(monkeypatch):
    """The output gradients are consumed as the backward makes them, not all kept to its end."""
    model = models.randomize_norms(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))).eval()
    x = torch.randn(16, 3, 16, 16)
    mas = mk.MAS(model, importance="global", verify=False)
    mas.estimate([x])
    eager = peak_memory(lambda: mas.estimate([x]))
    monkeypatch.setattr(global_exact.ExactEstimator, "_eager", lambda self, *a: {})
    after = peak_memory(lambda: mas.estimate([x]))
    gradient = 4 * 16 * 16 * 16 * 16  # one layer's output gradient
    assert eager <= after - 2 * gradient, (eager, after)


def test_the_recorded_pass_leaves_nothing_alive():
    """An eager call's output hook holds its rule's closure, which holds the call and its output: a cycle through
    the autograd graph the collector cannot see. The hooks are removed after the backward, so the graph of each
    pass (and every tensor it saved) is freed with it."""
    model = models.randomize_norms(models.ResNetish()).eval()
    mas = mk.MAS(model, importance="global", verify=False)
    x = torch.randn(4, 3, 8, 8)
    mas.estimate([x])  # the layout observed
    outs = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.register_forward_hook(lambda m, args, out: outs.append(weakref.ref(out)))
    mas.estimate([x, x])
    gc.collect()
    assert outs and all(o() is None for o in outs), [o() is None for o in outs]


def test_rules_inside_the_backward_with_per_sample_fallback_parameters():
    """The per-sample fallback's backward passes through the retained graph run after the hooks are gone: the
    eager rules add each batch's numerators once."""
    model = models.randomize_norms(models.ResNetish()).eval()
    low = "stem.0.weight"  # below every eager layer: each per-sample backward passes their outputs
    xs = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    with pytest.warns(RuntimeWarning, match="one backward pass per sample"):
        mas = mk.MAS(model, importance="global", verify=False,
                     per_sample_fallback=lambda name: name == low).estimate(xs).consolidate()
    close(mas.omega, ref.global_exact(model, [torch.cat(xs)]))
