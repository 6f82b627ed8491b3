"""The bench's timing rules (``bench.harness``) and its cases (``bench.cases``), not its numbers."""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench import cases, harness


def test_ratio_pairs_rounds_when_both_ran_in_all():
    # The machine got 10x slower for the last rounds (load from elsewhere):
    # per-round ratios see 1.1 throughout, a ratio of medians sees 11.
    ref = [1.0, 1.0, 1.0, 10.0, 10.0]
    ts = [1.1, 1.1, 11.0, 11.0, 11.0]
    assert harness.ratio(ts, ref) == pytest.approx(1.1)
    assert harness.ratio(ref, ref) == 1.0


def test_ratio_of_medians_when_one_side_was_cut_short():
    # A slow loop that ran in the first 3 rounds only is compared by medians.
    assert harness.ratio([100.0, 120.0, 110.0], [1.0, 2.0, 10.0, 10.0, 1.0]) == pytest.approx(110.0 / 2.0)


def test_measure_gives_fast_calls_many_rounds_and_slow_ones_at_least_three():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.02)

    def fast():
        calls.append("fast")

    times = harness.measure({"slow": slow, "fast": fast}, torch.device("cpu"), reps=12, warmup=1, budget_s=0.03)
    assert len(times["fast"]) == 12 and len(times["slow"]) == 3
    assert all(t >= 0.02 for t in times["slow"])
    # Interleaved: the slow one's timed rounds are the first three, alternating with the fast one.
    timed = calls[2:]  # after one warm-up call each
    assert timed[:6].count("slow") == 3 and timed[6:] == ["fast"] * 9


def test_param_lists_have_their_models_sizes():
    # torchvision's ResNet-50 and BERT-base (with pooler): tensors and elements.
    for shapes_of, tensors, elements in ((cases.resnet50_shapes, 161, 25_557_032),
                                         (cases.transformer_shapes, 199, 109_482_240)):
        shapes = shapes_of(1.0)
        assert len(shapes) == tensors and sum(math.prod(s) for s in shapes) == elements
        assert len(shapes_of(0.125)) == tensors


@pytest.mark.parametrize("model", ["resnet50", "transformer"])
def test_penalty_case_implementations_compute_the_same_value(model):
    # A side-by-side timing means something only if every row computes the same penalty.
    case = cases.penalty_case(1 / 64, torch.float32, torch.device("cpu"), use_compile=False, quick=True, model=model)
    values = {name: float(case.impls[name]().detach()) for name in
              ("avalanche loop", "foreach", "ours", "ours, torch.ops (as mk.MAS)", "ours, 1 flat tensor")}
    want = values.pop("avalanche loop")
    assert want > 0
    for name, v in values.items():
        assert v == pytest.approx(want, rel=1e-4), name
