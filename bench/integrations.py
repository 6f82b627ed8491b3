"""The integrations' cases: an epoch with each framework's own MAS (or the penalty as a loss term) beside ours.

Every case times whole epochs of the framework's own loop at learning rate 0 (the update is computed
and applied, the weights do not drift over the timed rounds), after one consolidated task, with the
importance estimation at the task's end switched off for the timing (Avalanche's importance has a
case of its own). A framework that is not installed has no case (``make`` installs all three).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import Case

FRAMEWORKS = {"avalanche": "avalanche", "transformers": "transformers", "lightning": "lightning.pytorch"}


def available(name: str) -> bool:
    try:
        return importlib.util.find_spec(FRAMEWORKS[name]) is not None
    except ModuleNotFoundError:
        return False


def import_torchvision() -> None:
    """Import torchvision (Avalanche imports it at start-up), also where its compiled ops cannot load.

    PyPI's torchvision wheel for x86_64 is built against a CUDA torch: beside a CPU torch its ``_C``
    library does not load, and torchvision 0.28's ``_meta_registrations`` then fails on import
    ("operator torchvision::nms does not exist"): it registers fake kernels for ``nms`` and ``qnms``
    without checking that the ops exist, as it does for its other ops. Declaring those two schemas
    (no kernels: calling them still raises) lets the pure-Python torchvision that Avalanche imports
    (transforms, dataset classes) load; nothing on Avalanche's MAS path calls a torchvision op.
    ``make`` installs that torchvision in ``.venv/avalanche-torchvision``, off ``sys.path`` for
    everything else (transformers imports torchvision when it finds one): it is added here.
    """
    aside = os.path.join(sys.prefix, "avalanche-torchvision")
    added = importlib.util.find_spec("torchvision") is None and os.path.isdir(aside)
    if added:
        sys.path.append(aside)
    try:
        _import_torchvision()
    finally:
        # Off sys.path again once imported (the package finds its submodules through its own __path__): a
        # process started from this one (multiprocessing's spawn copies sys.path) imports transformers,
        # which would import this torchvision when it finds one.
        if added and aside in sys.path:
            sys.path.remove(aside)


def _import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.lib = lib  # the definitions live as long as the library object
    import torchvision  # noqa: F401,F811


def _mlp() -> nn.Module:
    """The demo's MLP, 784-400-400-10 (0.48M parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                         nn.Linear(400, 10))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _size(model: nn.Module, what: str) -> tuple[str, int]:
    n = sum(p.numel() for p in model.parameters())
    return f"{what} ({n / 1e6:.2f}M params)", n


def _no_task_end(obj, name: str) -> None:
    """Switch off an end-of-task hook on this instance (the timed epochs re-run the same task)."""
    setattr(obj, name, lambda *a, **k: None)


# ----------------------------------------------------------------- Avalanche
def _avalanche_setup(device: torch.device, n: int = 640, batch: int = 64):
    import_torchvision()
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins import MASPlugin as AvalancheMAS

    from mas_kernels.integrations.avalanche import MASPlugin

    (x, y), (tx, ty) = _data(2 * n, 0), _data(256, 1)
    bench = nc_benchmark(tensor_dataset(x, y), tensor_dataset(tx, ty), 2, task_labels=False, shuffle=False, seed=0)
    base = _mlp()
    plugins = {"naive (no MAS)": None, "avalanche MASPlugin": AvalancheMAS(lambda_reg=1.0),
               "ours MASPlugin": MASPlugin(lambda_reg=1.0)}
    strategies = {}
    for name, plugin in plugins.items():
        model = copy.deepcopy(base)
        s = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), criterion=nn.CrossEntropyLoss(),
                  train_mb_size=batch, train_epochs=1, eval_mb_size=256, device=device,
                  plugins=[] if plugin is None else [plugin], evaluator=EvaluationPlugin(loggers=[]))
        torch.manual_seed(0)
        s.train(bench.train_stream[0], num_workers=0)  # the first task, consolidated
        for group in s.optimizer.param_groups:
            group["lr"] = 0.0
        strategies[name] = (s, plugin)
    return bench, base, strategies


def avalanche_epoch_case(device: torch.device) -> Case:
    """One epoch of the second experience (10 batches of 64) with Avalanche's MASPlugin (the penalty as a
    loss term, before backward) and ours (its gradient fused after backward), beside no MAS."""
    bench, base, strategies = _avalanche_setup(device)
    exp = bench.train_stream[1]
    impls: dict[str, Callable] = {}
    for name, (s, plugin) in strategies.items():
        if plugin is not None:
            _no_task_end(plugin, "after_training_exp")
        impls[name] = lambda s=s: s.train(exp, num_workers=0)
    size, n = _size(base, "mlp-400, 640 samples, batch 64")
    return Case("avalanche_epoch", "float32", size, n, "epochs", 1.0, impls, baseline="naive (no MAS)")


def avalanche_importance_case(device: torch.device) -> Case:
    """Importance over one experience (640 samples, batches of 64, train mode): Avalanche's per-batch
    loop against the plugin's wrapper (its default global_batch rule, and the exact rule)."""
    from torch.utils.data import DataLoader

    import mas_kernels as mk

    bench, base, strategies = _avalanche_setup(device)
    theirs, their_plugin = strategies["avalanche MASPlugin"]
    ours, our_plugin = strategies["ours MASPlugin"]
    theirs.experience = ours.experience = bench.train_stream[1]
    loader = DataLoader(bench.train_stream[1].dataset, batch_size=64)
    exact = mk.MAS(copy.deepcopy(ours.model), importance="global", forward=lambda m, b: m(b[0]))

    impls = {
        "avalanche _get_importance": lambda: their_plugin._get_importance(theirs),
        "ours, global_batch (the plugin's)": lambda: our_plugin.mas.estimate(loader, train_mode=True),
        "ours, global (exact)": lambda: exact.estimate(loader),
    }
    size, n = _size(base, "mlp-400, 640 samples, batch 64")
    return Case("avalanche_importance", "float32", size, n, "passes", 1.0, impls,
                baseline="avalanche _get_importance")


# -------------------------------------------------------------- transformers
def transformers_epoch_case(device: torch.device) -> Case:
    """One Trainer epoch of a small GPT-2 (2 layers, 128 dims, 1000 tokens; 128 sequences of 32, batch
    16): plain, with the penalty as a loss term in compute_loss, and with MASCallback."""
    import tempfile

    import transformers

    from mas_kernels.integrations.transformers import MASCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    base = transformers.GPT2LMHeadModel(cfg).to(device)
    ids = torch.randint(0, 1000, (128, 32))
    data = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in ids]
    out = tempfile.mkdtemp(prefix="mas-bench-")
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=16, num_train_epochs=1,
                                          learning_rate=0.0, report_to=[], logging_strategy="no", save_strategy="no",
                                          use_cpu=device.type == "cpu", disable_tqdm=True, seed=0)

    def trainer(model, data, cls=transformers.Trainer, **kw):
        t = cls(model=model, args=args, train_dataset=data, **kw)
        t.remove_callback(transformers.trainer_callback.PrinterCallback)  # its end-of-train dict, per round
        return t

    cb = MASCallback(lam=1.0, save=False)
    ours = copy.deepcopy(base)
    trainer(ours, data[:32], callbacks=[cb]).train()  # task 1
    _no_task_end(cb, "on_train_end")
    omega = {k: v.clone() for k, v in cb.mas.omega.items()}
    anchors = {k: v.clone() for k, v in cb.mas.anchors.items()}

    class LossTerm(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss + sum((omega[n] * (p - anchors[n]).pow(2)).sum() for n, p in model.named_parameters())

    trainers = {
        "Trainer": trainer(copy.deepcopy(base), data),
        "+ loss-term penalty": trainer(copy.deepcopy(base), data, LossTerm),
        "+ MASCallback": trainer(ours, data, callbacks=[cb]),
    }
    impls = {name: t.train for name, t in trainers.items()}
    size, n = _size(base, "gpt2 2x128, 128 x 32 tokens, batch 16")
    return Case("transformers_epoch", "float32", size, n, "epochs", 1.0, impls, baseline="Trainer")


# ---------------------------------------------------------------- Lightning
def lightning_epoch_case(device: torch.device, n: int = 640, batch: int = 64) -> Case:
    """One Lightning epoch of the demo MLP (10 batches of 64): plain, with the penalty as a loss term in
    training_step, and with MASCallback."""
    import logging

    import lightning.pytorch as pl

    from mas_kernels.integrations.lightning import MASCallback

    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips: per fit, i.e. per round
        logging.getLogger(name).setLevel(logging.WARNING)

    class Net(pl.LightningModule):
        def __init__(self, penalty=None):
            super().__init__()
            self.net, self.penalty = _mlp(), penalty

        def forward(self, x):
            return self.net(x)

        def training_step(self, b, _):
            loss = F.cross_entropy(self(b[0]), b[1])
            return loss if self.penalty is None else loss + self.penalty(self)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x, y = _data(n, 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)

    def fit(module, callbacks=()):
        pl.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks)).fit(module, loader)

    torch.manual_seed(0)
    base = Net()
    ours, cb = copy.deepcopy(base), MASCallback(lam=1.0, max_batches=4)
    fit(ours, [cb])  # task 1, consolidated
    _no_task_end(cb, "on_train_end")
    omega = {k: v.clone() for k, v in cb.mas.omega.items()}
    anchors = {k: v.clone() for k, v in cb.mas.anchors.items()}

    def loss_term(module):
        return sum((omega[k] * (p - anchors[k]).pow(2)).sum() for k, p in module.named_parameters())

    plain, term = copy.deepcopy(base), copy.deepcopy(base)
    term.penalty = loss_term
    impls = {"Trainer.fit": lambda: fit(plain), "+ loss-term penalty": lambda: fit(term),
             "+ MASCallback": lambda: fit(ours, [cb])}
    size, n_params = _size(base, "mlp-400, 640 samples, batch 64")
    return Case("lightning_epoch", "float32", size, n_params, "epochs", 1.0, impls, baseline="Trainer.fit")


def plan(device: torch.device) -> list[tuple[str, Callable[[], Case]]]:
    """The cases of the frameworks installed here, as (section, builder)."""
    cases = []
    if available("avalanche"):
        cases += [("integrations", lambda: avalanche_epoch_case(device)),
                  ("integrations", lambda: avalanche_importance_case(device))]
    if available("transformers"):
        cases.append(("integrations", lambda: transformers_epoch_case(device)))
    if available("lightning"):
        cases.append(("integrations", lambda: lightning_epoch_case(device)))
    for name in FRAMEWORKS:
        if not available(name):  # the CLI skips it with a line naming the extra
            cases.append(("integrations", lambda m=FRAMEWORKS[name]: _missing(m)))
    return cases


def _missing(module: str):
    raise ModuleNotFoundError(f"No module named {module!r}", name=module)
