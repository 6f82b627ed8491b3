"""End to end with the MAS wrapper: training steps with and without the penalty, inference with online importance."""

import pytest

from bench.cases import inference_case, train_case

MODELS = [("mlp-400", 64), ("mlp-400", 256), ("mlp-1024", 128), ("cnn", 32)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{m}-b{b}" for m, b in MODELS])
def train(request, device):
    return train_case(*request.param, device)


@pytest.mark.parametrize("impl", ["plain step", "+ mas.add_penalty_grad_()", "+ mas.penalty() in the loss",
                                  "+ avalanche-style penalty"])
def test_train_step(bench_case, train, impl):
    bench_case(train, impl)


@pytest.fixture(scope="module", params=MODELS, ids=[f"{m}-b{b}" for m, b in MODELS])
def inference(request, device):
    case = inference_case(*request.param, device)
    yield case
    case.notes.pop("_session").close()


@pytest.mark.parametrize("impl", ["plain", "online local importance"])
def test_inference(bench_case, inference, impl):
    bench_case(inference, impl)
