"""pytest-benchmark setup for ``pytest bench/`` (not part of the test suite: ``make test`` runs ``tests/``).

The cases (inputs and implementations) come from :mod:`bench.cases`, the
module behind ``python -m bench``, so both measure the same code.
Run e.g. ``pytest bench/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds``.
"""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def bench_case(benchmark):
    """``bench_case(case, impl)``: benchmark one implementation of a ``bench.harness.Case``."""
    return lambda case, impl: _run(benchmark, case, impl)


def _run(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{impl!r} not available here: {case.notes or 'not applicable'}")
    benchmark.group = f"{case.op} {case.dtype} {case.size}"
    benchmark.extra_info.update({"op": case.op, "dtype": case.dtype, "size": case.size, case.unit: case.amount,
                                 "bound": case.bound, "baseline": case.baseline})
    fn = case.impls[impl]
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = fn
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
