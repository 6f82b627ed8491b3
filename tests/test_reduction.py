"""The seam between what a layer's per-sample gradient is and how it is reduced (issue #24).

A reduction other than MAS's ``|.|`` lands without touching any layer rule: here EWC's squared gradients,
``sum_k g_k^2`` (the Fisher diagonal with the squared output norm as the loss), defined in this test file
alone, through the estimators' documented seam (``mas_kernels.estimators``), against the one-sample oracle.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mas_kernels.estimators import ExactEstimator, Plan, Reduction
from mas_kernels.estimators.batch import Batch, Layouts
from tests import models
from tests import reference as ref
from tests.test_exact_layers import close


class Square(Reduction):
    """``r(g) = g^2``: nothing but ``apply`` (the factored form falls back to per-sample products)."""

    name = "square"

    def apply(self, g):
        return g * g


def squared(model, x, output_fn=lambda o: o):
    params = dict(model.named_parameters())
    plan = Plan(model, params)
    estimator = ExactEstimator(model, params, plan, output_fn, reduction=Square())
    batch = Batch(model, lambda m: m(x))
    Layouts(model, plan, params, output_fn, exact=True).resolve(batch)
    staging = {n: torch.zeros_like(p) for n, p in params.items()}
    estimator.run(batch, staging)
    return {n: t / batch.n for n, t in staging.items()}


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)), torch.randn(7, 5)),
    (lambda: models.randomize_norms(models.ResNetish()), torch.randn(4, 3, 8, 8)),
    (lambda: models.TextLSTM().eval(), torch.randint(1, 11, (3, 6))),
    (lambda: models.Encoder(), torch.randn(3, 5, 8)),
], ids=["mlp-layernorm", "resnet-batchnorm", "lstm", "mha-encoder"])
def test_a_squared_reduction_without_touching_any_layer_rule(make, x):
    torch.manual_seed(0)
    model = make().eval()
    got = squared(model, x)
    expected = ref.per_sample_sum(model, [x], lambda g: g * g)
    close(got, expected)


def test_a_squared_reduction_on_gpt2_with_tied_weights():
    model = models.gpt2()
    ids = torch.randint(0, 40, (3, 5))
    out = lambda o: o.logits  # noqa: E731
    close(squared(model, ids, out), ref.per_sample_sum(model, [ids], lambda g: g * g, out))


@pytest.mark.parametrize("reduction, r", [(Square(), lambda g: g * g), (None, torch.abs)], ids=["square", "abs"])
def test_the_self_checks_literal_definition_with_any_reduction(reduction, r):
    """The self-check's reference (one forward and backward per sample, ``Reduction.accumulate_`` from the
    second sample on) against the oracle on those samples alone; a ViT-style block's q/k/v gradients come
    from autograd as views of one buffer."""
    from mas_kernels.estimators.reduction import ABS
    from mas_kernels.estimators.verify import literal

    torch.manual_seed(0)
    model = models.Encoder().eval()
    x = torch.randn(4, 5, 8)
    params = dict(model.named_parameters())
    plan = Plan(model, params)
    batch = Batch(model, lambda m: m(x))
    Layouts(model, plan, params, lambda o: o, exact=True).resolve(batch)
    got, outputs = literal(batch, [1, 3], params, lambda o: o, reduction or ABS)
    close(got, {k: 2 * v for k, v in ref.per_sample_sum(model, [x[[1, 3]]], r).items()})  # a sum, not a mean
    assert len(outputs) == 2 and torch.allclose(outputs[1], model(x[3:4]), atol=1e-6)
