"""The bench's timing rules (``bench.harness``) and its cases (``bench.cases``), not its numbers."""

from __future__ import annotations

import math
import os
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
        # The loop and foreach sum ~1e6 float32 terms in orders that depend on the thread count: with one thread
        # foreach's norm differed from the loop's sum by 1.6e-4 relative (the transformer list).
        assert v == pytest.approx(want, rel=1e-3), name


def _row(op, impl, unit=None, ratio=1.2, baseline=False, n=1000.0):
    row = {"op": op, "impl": impl, "device": "cpu", "dtype": "float32", "size": f"{op} case (1M params)", "n": n,
           "seconds": 0.01, "q20": 0.009, "q80": 0.011, "reps": 5, "ratio_to_bound": None,
           "ratio_to_baseline": 1.0 if baseline else ratio, "is_bound": False, "is_baseline": baseline}
    if unit:
        row[unit] = 1e6
    return row


def test_report_plots_and_tabulates_every_kind_of_row(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import report

    rows = [_row("penalty_grad", impl, "bytes", n=n) for impl in ("ours", "copy bound") for n in (1e3, 1e6)]
    rows += [_row("abs_outer", "ours", "flops", n=n) for n in (1e3, 1e6)]
    for op in ("train_step", "importance", "lightning_epoch", "an_op_no_panel_names"):
        rows += [_row(op, "plain", baseline=True), _row(op, "with MAS", ratio=1.3)]
    info = {"cpu": "test cpu", "cpu_cores": 2, "torch_threads": 2, "torch": torch.__version__}
    path = tmp_path / "bench.png"
    report.plot(rows, info, str(path))
    assert path.stat().st_size > 10_000
    table = report.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) + 5  # header, rule, a row each, a blank line between cases
    assert any("+30.0%" in line for line in table if line.startswith("train_step"))


def test_peak_memory_drops_the_profilers_progress_lines_and_keeps_other_stderr(capfd):
    def fn():
        torch.ones(1000).add_(1)
        os.write(2, b"a line of our own\n")

    assert harness.peak_memory(fn) >= 4000
    err = capfd.readouterr().err
    assert "a line of our own" in err
    assert "USDT:" not in err and "profiler_start" not in err


def test_optim_case_rows_update_the_same_state():
    # The optimizer-step rows: each one a real step (lr = 0, so the parameters stay put while the
    # moments move), the separate pass and the fused step giving the same moments.
    case = cases.optim_case("resnet50", torch.device("cpu"), 1 / 64)
    params = [p for p in case.impls["AdamW(fused=True)"].__self__.param_groups[0]["params"]]
    before = [p.detach().clone() for p in params]
    ours = case.impls["mk.optim.AdamW (penalty in the step)"].__self__
    ours.step()  # first: the separate pass adds the penalty gradient into .grad
    case.impls["+ add_penalty_grad_() (separate pass)"]()
    fused = case.impls["AdamW(fused=True)"].__self__
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        torch.testing.assert_close(ours.state[p]["exp_avg"], fused.state[p]["exp_avg"], rtol=1e-5, atol=1e-8)
    assert float(ours.last_penalty) > 0


def test_added_fraction():
    rows = [{"impl": "AdamW(fused=True)", "ratio_to_baseline": 1.0},
            {"impl": "+ add_penalty_grad_() (separate pass)", "ratio_to_baseline": 1.8},
            {"impl": "mk.optim.AdamW (penalty in the step)", "ratio_to_baseline": 1.2}]
    assert cases.added_fraction(rows) == pytest.approx(0.25)


def test_cli_skips_a_case_without_its_extra_survives_a_failing_one_and_keeps_the_rows(tmp_path, monkeypatch, capsys):
    import json

    from bench import __main__ as cli

    def good():
        return harness.Case("tiny_op", "float32", "n=1", 1.0, "bytes", 8.0, {"plain": lambda: None, "ours": lambda: None},
                            baseline="plain")

    def needs_transformers(kind="gpt2"):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    def broken():
        raise RuntimeError("a bug in this case")

    monkeypatch.setattr(cli.cases, "plan", lambda quick, device, use_compile: [
        ("penalty", good), ("importance", needs_transformers), ("conv", broken), ("e2e", good)])
    path = tmp_path / "rows.json"
    assert cli.main(["--quick", "--reps", "3", "--json", str(path)]) == 1  # a case failed: not a clean run
    out = capsys.readouterr()
    assert "skipped importance gpt2: needs transformers (pip install 'mas_kernels[transformers]')" in out.err
    assert "FAILED conv: RuntimeError: a bug in this case" in out.err
    assert "measuring mas_kernels from " in out.out  # the header names the package measured
    rows = json.loads(path.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["plain", "ours"] * 2  # both good cases' rows were kept


def test_cli_interrupted_midway_keeps_the_rows_measured(tmp_path, monkeypatch):
    import json

    from bench import __main__ as cli

    def good():
        return harness.Case("tiny_op", "float32", "n=1", 1.0, "bytes", 8.0, {"plain": lambda: None}, baseline="plain")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.cases, "plan", lambda quick, device, use_compile: [("penalty", good), ("e2e", interrupted)])
    path = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--reps", "3", "--json", str(path)])
    assert [r["impl"] for r in json.loads(path.read_text())["rows"]] == ["plain"]


def test_peers_check_flags_a_wrong_or_missing_tensor_and_passes_float32_rounding():
    from bench import peers

    expected = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([3.0, 0.5], dtype=torch.float64),
                "tiny": torch.tensor([1e-9, 0.0], dtype=torch.float64)}
    right = {"a": torch.tensor([1.0, 2.0 + 1e-6]), "b": torch.tensor([3.0, 0.5]), "tiny": torch.tensor([1e-5, 0.0])}
    assert peers.check(right, expected) == []
    assert peers.check({**right, "b": torch.tensor([3.0, 0.7])}, expected) == ["b"]
    assert peers.check({"a": right["a"], "tiny": right["tiny"]}, expected) == ["b (missing)"]


def test_the_oracle_and_a_peer_agree_on_a_small_model():
    from bench import peers

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = peers.oracle(model, x, lambda o: o)
    fn, why = peers.build("torch.func", model, x, lambda o: o, expected)
    assert why is None and peers.check(fn(), expected) == []


def test_conv_exact_case_times_every_strategy_against_the_weight_gradient():
    from bench.cases import conv_exact_case

    case = conv_exact_case(2, 4, 4, 6, 3, 1, 1, torch.device("cpu"))
    assert case.bound == "plain weight-grad bound" and {"unfold", "grouped"} <= set(case.impls)
    assert case.notes["chosen"] in case.impls
    for fn in case.impls.values():
        fn()
