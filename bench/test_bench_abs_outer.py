"""Importance: abs_outer_accumulate_ (Linear) and the conv rule, against the peers' ways and a plain matmul."""

import pytest
import torch

from bench.cases import abs_outer_case, conv_case

SHAPES = [(64, 256, 256), (256, 1024, 1024), (1024, 2048, 2048)]


@pytest.fixture(scope="module", params=[(d, s) for d in (torch.float32, torch.bfloat16) for s in SHAPES],
                ids=lambda p: f"{str(p[0]).replace('torch.', '')}-N{p[1][0]}-{p[1][1]}x{p[1][2]}")
def outer(request, device):
    dtype, (n, j, i) = request.param
    return abs_outer_case(n, j, i, dtype, device)


@pytest.mark.parametrize("impl", ["addmm_(|a|^T,|b|)", "ours", "per-sample loop", "matmul bound"])
def test_abs_outer(bench_case, outer, impl):
    bench_case(outer, impl)


@pytest.fixture(scope="module", params=[(16, 32, 32, 16), (64, 64, 64, 32)], ids=["small", "large"])
def conv(request, device):
    return conv_case(*request.param, torch.float32, device)


@pytest.mark.parametrize("impl", ["unfold+einsum", "conv2d_weight(|x|,|y|)", "plain weight-grad bound"])
def test_conv_importance(bench_case, conv, impl):
    bench_case(conv, impl)
