"""abs_accumulate_ over the ResNet-50-like list: the per-tensor PyTorch loop, foreach, ours, the copy bound."""

import pytest
import torch

from bench.cases import abs_accumulate_case

IMPLS = ["torch loop", "foreach", "ours", "copy bound"]


@pytest.fixture(scope="module", params=[0.25, 1.0], ids=["width0.25", "width1"])
def case(request, device):
    return abs_accumulate_case(request.param, torch.float32, device)


@pytest.mark.parametrize("impl", IMPLS)
def test_abs_accumulate(bench_case, case, impl):
    bench_case(case, impl)
