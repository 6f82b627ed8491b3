"""mas_kernels.integrations.avalanche.MASPlugin against Avalanche's own MASPlugin (avalanche-lib 0.6.0).

The reference here is Avalanche itself: the same strategy, model, weights and data order, once with
Avalanche's plugin (importance from its per-batch loop, penalty as a loss term) and once with ours.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from bench.integrations import import_torchvision

if importlib.util.find_spec("avalanche") is None:
    pytest.skip("avalanche-lib is not installed (pip install 'mas_kernels[avalanche]'; `make test` installs it)",
                allow_module_level=True)

import_torchvision()  # Avalanche imports it: see bench/integrations.py for how, beside a CPU torch

from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule, SimpleMLP  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import MASPlugin as AvalancheMASPlugin  # noqa: E402
from avalanche.training.templates.base import PositionalArgumentsDeprecatedWarning  # noqa: E402

from mas_kernels.integrations.avalanche import MASPlugin  # noqa: E402

REL = 1e-5


def benchmark(task_labels: bool, per_class: int = 23, n_features: int = 6, seed: int = 1234):
    """Avalanche's test benchmark (tests/unit_tests_utils.py ``get_fast_benchmark``): 10 classes of
    sklearn's ``make_classification``, 5 experiences of 2 classes; ``per_class=23`` gives experiences of
    27-28 training samples, so batches of 8 leave a short last batch."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=10 * per_class, n_classes=10, n_features=n_features, n_informative=6,
                               n_redundant=0, random_state=seed)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, train_size=0.6, shuffle=True, stratify=y, random_state=seed)
    train = _make_taskaware_tensor_classification_dataset(tr_x, tr_y)
    test = _make_taskaware_tensor_classification_dataset(te_x, te_y)
    return nc_benchmark(train, test, 5, task_labels=task_labels, shuffle=True, seed=seed)


class MultiTask(MultiTaskModule):
    """A body and one head per task (``model(x, task_labels)``), heads added as tasks appear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.classifier = MultiHeadClassifier(12)

    def forward(self, x, task_labels):
        return self.classifier(self.features(x), task_labels)


class Record(SupervisedPlugin):
    """The loss each iteration reports (what Avalanche's loss metrics log)."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def after_training_iteration(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss.detach()))


def strategy(model, plugin, record, mb=8, epochs=2, lr=0.05):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=nn.CrossEntropyLoss(),
                 train_mb_size=mb, train_epochs=epochs, eval_mb_size=64, device="cpu", plugins=[plugin, record],
                 evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))


def assert_rel(got: dict, expected: dict, what: str):
    assert set(got) == set(expected), (what, set(got) ^ set(expected))
    for name in expected:
        g, e = got[name].double(), expected[name].double()
        assert g.shape == e.shape, (what, name, g.shape, e.shape)
        scale = e.abs().max().clamp_min(1e-30)
        err = float((g - e).abs().max() / scale)
        assert err <= REL, f"{what}[{name}]: max |ours - avalanche| / max |avalanche| = {err:.2e}"


@pytest.mark.parametrize("kind", ["class-incremental, a growing head", "task-incremental, a head per task"])
def test_importance_penalty_and_training_equal_avalanche(kind):
    """Three experiences, ragged batches (27-28 samples in batches of 8), lambda 10: after each one the
    importance, theta* and the weights of the two runs agree, and so do the logged losses (task loss
    plus penalty) at every iteration."""
    torch.manual_seed(0)
    multi = kind.startswith("task")
    if multi:
        model = MultiTask()
    else:
        model = SimpleMLP(num_classes=2, input_size=6, hidden_size=12, drop_rate=0.0)
        model.classifier = IncrementalClassifier(12, initial_out_features=2)
    bench = benchmark(task_labels=multi)
    theirs = AvalancheMASPlugin(lambda_reg=10.0, alpha=0.5)
    ours = MASPlugin(lambda_reg=10.0, alpha=0.5)
    rec_a, rec_b = Record(), Record()
    a = strategy(model, theirs, rec_a)
    b = strategy(copy.deepcopy(model), ours, rec_b)
    for i, exp in enumerate(bench.train_stream[:3]):
        torch.manual_seed(100 + i)
        a.train(exp, num_workers=0)
        torch.manual_seed(100 + i)
        b.train(exp, num_workers=0)
        imp = {n: p.data for n, p in theirs.importance.items()}
        anchors = {n: p.data for n, p in theirs.params.items()}
        assert_rel(ours.importance, imp, f"experience {i}: importance")
        assert_rel(ours.params, anchors, f"experience {i}: theta*")
        assert_rel(dict(b.model.named_parameters()), dict(a.model.named_parameters()), f"experience {i}: weights")
        assert sum(float(v.sum()) for v in imp.values()) > 0
    torch.testing.assert_close(torch.tensor(rec_b.losses), torch.tensor(rec_a.losses), rtol=REL, atol=1e-6)
    if not multi:  # the head grew (2 outputs at first; the largest class id seen + 1 now)
        grown = b.model.classifier.classifier.out_features
        assert ours.importance["classifier.classifier.weight"].shape[0] == grown > 2


def test_penalty_value_and_gradient_equal_avalanche_loss_term():
    """One batch of the second experience on the same weights: Avalanche's loss term (before backward)
    and ours (after backward) give the same loss and the same gradient."""
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=6, hidden_size=12, drop_rate=0.0)
    bench = benchmark(task_labels=False)
    theirs, ours = AvalancheMASPlugin(lambda_reg=3.0), MASPlugin(lambda_reg=3.0)
    a = strategy(model, theirs, Record())
    b = strategy(copy.deepcopy(model), ours, Record())
    torch.manual_seed(1)
    a.train(bench.train_stream[0], num_workers=0)
    torch.manual_seed(1)
    b.train(bench.train_stream[0], num_workers=0)
    with torch.no_grad():  # drift away from theta*, the same on both
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            pa.add_(0.1 * torch.randn_like(pa))
            pb.copy_(pa)
    x, y = next(iter(torch.utils.data.DataLoader(bench.train_stream[1].dataset, batch_size=16)))[:2]
    grads, losses = [], []
    for s, plugin in ((a, theirs), (b, ours)):
        s.clock.train_exp_counter = 1
        s.model.zero_grad()
        s.loss = nn.functional.cross_entropy(s.model(x), y)
        if plugin is theirs:
            plugin.before_backward(s)
            s.loss.backward()
        else:
            s.loss.backward()
            plugin.after_backward(s)
        losses.append(float(s.loss))
        grads.append({n: p.grad.clone() for n, p in s.model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=REL)
    assert_rel(grads[1], grads[0], "gradient")
    ce = float(nn.functional.cross_entropy(b.model(x), y))
    assert losses[0] - ce > 1e-3 * ce  # the penalty is a visible part of the loss


@pytest.mark.slow
def test_avalanches_own_test_mas_with_our_plugin(monkeypatch):
    """Avalanche's tests/training/test_strategies.py::StrategyTest::test_mas (v0.6.0), with the MAS
    strategy's plugin replaced by ours: SimpleMLP(input_size=6, hidden_size=10) with dropout, SGD
    lr=1e-4, train_mb_size=10, 2 epochs, its 5-experience benchmark, run_strategy (train each
    experience, then evaluate on the whole test stream)."""
    from avalanche.logging import TextLogger
    from avalanche.training import MAS
    from avalanche.training.supervised import strategy_wrappers

    monkeypatch.setattr(strategy_wrappers, "MASPlugin", MASPlugin)
    torch.manual_seed(0)
    model = SimpleMLP(input_size=6, hidden_size=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    bench = benchmark(task_labels=False, per_class=100)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        s = MAS(model, optimizer, nn.CrossEntropyLoss(), lambda_reg=1.0, alpha=0.5, train_mb_size=10,
                device="cpu", eval_mb_size=50, train_epochs=2)
    plugin = next(p for p in s.plugins if isinstance(p, MASPlugin))
    s.evaluator.loggers = [TextLogger(open("/dev/null", "w"))]
    results = []
    for exp in bench.train_stream:
        s.train(exp, num_workers=0)
        results.append(s.eval(bench.test_stream[:]))
    assert len(results) == 5 and plugin.mas.num_tasks == 5
    assert all(torch.isfinite(v).all() and float(v.sum()) > 0 for v in plugin.importance.values())


def test_arguments_are_checked_before_training():
    with pytest.raises(ValueError, match="lam"):
        MASPlugin(lambda_reg=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        MASPlugin(alpha=1.5)
    with pytest.raises(ValueError, match="importance"):
        MASPlugin(importance="fisher")
    with pytest.raises(TypeError, match="combine"):
        MASPlugin(combine="sum")
    with pytest.raises(TypeError, match="unknown MAS option"):
        MASPlugin(chunksize=4)


def test_plugin_pickles_and_the_unpickled_one_goes_on_where_it_was():
    """Avalanche checkpoints a strategy, plugins included, by pickling it (its own plugin pickles; ours
    could not: a local closure). Pickled with its model after an experience, the copy trains the next
    experience exactly as the original does."""
    import pickle

    pickle.loads(pickle.dumps(MASPlugin(lambda_reg=5.0, importance="global")))  # before any experience
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=6, hidden_size=12, drop_rate=0.0)
    bench = benchmark(task_labels=False)
    plugin = MASPlugin(lambda_reg=5.0)
    s = strategy(model, plugin, Record())
    torch.manual_seed(1)
    s.train(bench.train_stream[0], num_workers=0)
    model2, plugin2 = pickle.loads(pickle.dumps((s.model, plugin)))
    assert plugin2.mas.wrapper is model2 and plugin2.mas.num_tasks == 1
    assert_rel(plugin2.importance, plugin.importance, "unpickled importance")
    s2 = strategy(model2, plugin2, Record())
    s2.clock.train_exp_counter = s.clock.train_exp_counter  # as a resumed strategy's clock
    for st in (s, s2):
        torch.manual_seed(2)
        st.train(bench.train_stream[1], num_workers=0)
    assert plugin2.mas.num_tasks == 2
    assert_rel(plugin2.importance, plugin.importance, "importance after the next experience")
    assert_rel(dict(s2.model.named_parameters()), dict(s.model.named_parameters()), "weights")


@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_same_seed_same_random_stream_as_avalanches_plugin(drop_rate):
    """Avalanche's plugin iterates a DataLoader once (which draws a seed from the global RNG) and, with
    dropout, draws its masks; ours must draw the same, so that a user switching plugins gets the same
    next experience (the same shuffled batches) from the same seed."""
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=6, hidden_size=12, drop_rate=drop_rate)
    bench = benchmark(task_labels=False)
    rng, firsts = [], []
    for plugin in (AvalancheMASPlugin(lambda_reg=1.0), MASPlugin(lambda_reg=1.0)):
        s = strategy(copy.deepcopy(model), plugin, Record())
        torch.manual_seed(7)
        s.train(bench.train_stream[0], num_workers=0)
        rng.append(torch.random.get_rng_state())
        # The next experience's first training batch, as Naive shuffles it.
        loader = torch.utils.data.DataLoader(bench.train_stream[1].dataset, batch_size=8, shuffle=True)
        firsts.append(next(iter(loader))[0])
    assert torch.equal(rng[0], rng[1])
    assert torch.equal(firsts[0], firsts[1])
