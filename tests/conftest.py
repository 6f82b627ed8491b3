"""Test setup: Triton runs under its interpreter when there is no GPU.

This must happen before anything imports triton (torch._dynamo may), hence at
the top of conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mas_kernels import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = (["torch"] + (["triton"] if _backend.has_triton() else [])
            + (["native"] if _backend.native_available() else []))


def backend_in_use(device="cpu") -> str:
    """The implementation serving ``device`` now: ``torch``, ``triton`` or ``native``."""
    return _backend.choose(torch.device(device))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Put one implementation on the dispatcher for the test (``mk.use_backend``)."""
    with _backend.using(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
