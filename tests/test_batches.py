"""What a batch is: forward=, dict batches, keyword calls, extra arguments, sample counts (N)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_kernels as mk

TOL = dict(atol=1e-6, rtol=2e-5)


def close(got, expected):
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name].double(), **TOL, msg=lambda m: f"{name}: {m}")


class MultiHead(nn.Module):
    """Avalanche-style multi-task model: ``model(x, task_labels)``, one head per task."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 2), nn.Linear(5, 2)])

    def forward(self, x, task_labels):
        h = torch.tanh(self.body(x))
        out = torch.zeros(x.shape[0], 2)
        for t in task_labels.unique().tolist():
            sel = task_labels == t
            out = out.index_put((sel.nonzero()[:, 0],), self.heads[t](h[sel]))
        return out


class Masked(nn.Module):
    """``model(x, mask)``: masked-out input columns never reach the output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, mask=None):
        return self.lin(x if mask is None else x * mask)


@pytest.mark.parametrize("importance", ["global", "global_batch", "local"])
def test_forward_passes_task_labels(importance):
    model = MultiHead()
    x, t = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    batches = [(x[:5], None, t[:5]), (x[5:], None, t[5:])]
    mas = mk.MAS(model, importance=importance, forward=lambda m, b: m(b[0], b[2]))
    mas.estimate(batches).consolidate()
    assert mas.samples_consolidated == 8
    if importance == "global":
        expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        for k in range(8):
            out = model(x[k:k + 1], t[k:k + 1])
            gs = torch.autograd.grad(out.double().pow(2).sum(), list(model.parameters()), allow_unused=True)
            for (n, _), g in zip(model.named_parameters(), gs):
                if g is not None:
                    expected[n] += g.double().abs() / 8
        close(mas.omega, expected)


def test_a_model_that_needs_more_than_the_input_says_to_pass_forward():
    mas = mk.MAS(MultiHead(), importance="global")
    with pytest.raises(TypeError, match="forward="):
        mas.estimate([(torch.randn(3, 6), torch.zeros(3))])


def test_dict_batches_and_keyword_calls():
    model = Masked()
    x, mask = torch.randn(5, 6), torch.ones(5, 6)
    mask[:, 4:] = 0
    a = mk.MAS(model, importance="global").estimate([{"x": x, "mask": mask}]).consolidate()
    b = mk.MAS(model, importance="global")
    with b.accumulating():
        model(x=x, mask=mask)  # keyword-only: N from the first tensor argument
    assert b.num_samples == 5
    b.consolidate()
    for m in (a, b):
        # columns the mask removes have no importance (replaying the call without the mask gave 7.59)
        assert m.omega["lin.weight"][:, 4:].abs().sum() == 0
        assert m.omega["lin.weight"][:, :4].abs().sum() > 0
    close(a.omega, b.omega)


def test_accumulating_replays_extra_positional_arguments():
    model = Masked()
    x, mask = torch.randn(4, 6), torch.ones(4, 6)
    mask[:, :2] = 0
    mas = mk.MAS(model, importance="global")
    with mas.accumulating():
        model(x, mask)
    mas.consolidate()
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for k in range(4):
        out = model(x[k:k + 1], mask[k:k + 1])
        gs = torch.autograd.grad(out.double().pow(2).sum(), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            expected[n] += g.double().abs() / 4
    close(mas.omega, expected)


def test_samples_are_counted_in_the_model_call():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    mas = mk.MAS(model, importance="local")
    with torch.no_grad(), mas.accumulating():
        model(torch.randn(7, 6))
        model(torch.randn(6))  # one unbatched sample
    assert mas.num_samples == 8
    rnn = nn.GRU(3, 4)  # (T, N, D): samples in dim 1
    m2 = mk.MAS(rnn, importance="local", output_fn=lambda o: o[0])
    m2.estimate([torch.randn(5, 2, 3)])
    assert m2.num_samples == 2
