"""penalty+grad over the ResNet-50-like list (161 tensors, 25.6M elements): peers' ways, ours, the copy bound."""

import pytest
import torch

from mas_kernels.bench import penalty_case

IMPLS = ["avalanche loop", "foreach", "torch.compile, flat", "ours", "ours, torch.ops (as mk.MAS)",
         "ours, 1 flat tensor", "ours, torch path", "copy bound"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def case(request, device):
    return penalty_case(1.0, request.param, device, use_compile=True, quick=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_grad(bench_case, case, impl):
    bench_case(case, impl)
