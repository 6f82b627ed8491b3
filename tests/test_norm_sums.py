"""The native per-sample sums of the norm rules (csrc/norm_sums.cpp) against float64 formulas: BatchNorm's
``sum_l d (x - mean_c)`` and ``sum_l d`` per sample and channel, LayerNorm's (RMSNorm's) ``sum_t d x_hat`` and
``sum_t d`` per sample, from float32/bfloat16/float16 inputs."""

from __future__ import annotations

import pytest
import torch

from mas_kernels import _backend, _native
from tests import reference as ref

pytestmark = pytest.mark.skipif(not _backend.native_available(), reason="the native extension is not built")
F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_sums(dtype):
    x, d = torch.randn(4, 5, 37).to(dtype), torch.randn(4, 5, 37).to(dtype)
    mean = torch.randn(5)
    got = _native.lib().channel_sums(x, d, mean)
    xd, dd = x.to(F64), d.to(F64)
    torch.testing.assert_close(got[..., 0].double(), (dd * (xd - mean.double()[:, None])).sum(-1), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(got[..., 1].double(), dd.sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_sums(dtype, rms):
    x, d = (3 * torch.randn(3, 7, 19) + 1).to(dtype), torch.randn(3, 7, 19).to(dtype)
    got = _native.lib().layer_norm_sums(x, d, 1e-5, rms)
    dd = d.to(F64)
    x_hat = ref.last_dim_x_hat(x, 1e-5, rms)
    torch.testing.assert_close(got[:, 0].double(), (dd * x_hat).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1].double(), dd.sum(1), atol=1e-5, rtol=1e-5)
