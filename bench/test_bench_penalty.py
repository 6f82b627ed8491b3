"""penalty+grad over the ResNet-50-like list (161 tensors, 25.6M elements) and, on a GPU, the
transformer-like list (199 tensors, 109M elements): peers' ways, ours, the copy bound."""

import pytest
import torch

from bench.cases import penalty_case

IMPLS = ["avalanche loop", "foreach", "torch.compile, flat", "ours", "ours, torch.ops (as mk.MAS)",
         "ours, 1 flat tensor", "ours, torch path", "copy bound"]
MODELS = ["resnet50"] + (["transformer"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=[(m, d) for m in MODELS for d in (torch.float32, torch.bfloat16)],
                ids=lambda p: f"{p[0]}-{str(p[1]).replace('torch.', '')}")
def case(request, device):
    model, dtype = request.param
    return penalty_case(1.0, dtype, device, use_compile=True, quick=False, model=model)


@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_grad(bench_case, case, impl):
    bench_case(case, impl)
