"""Test setup: Triton runs under its interpreter when there is no GPU.

This must happen before anything imports triton (torch._dynamo may), hence at
the top of conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mas_kernels as mk  # noqa: E402
from tests.helpers import using_backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_INFO = mk.backend_info()
BACKENDS = (["torch"] + (["triton"] if _INFO.triton["installed"] else [])
            + (["native"] if _INFO.native["available"] else []))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Put one implementation on the dispatcher for the test (``mk.use_backend``)."""
    with using_backend(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
