"""mas_kernels.integrations.lightning.MASCallback on a real Lightning Trainer with a small MLP.

Two binary tasks on one body, a head each: A labels a sample by the sign of feature 0, B by the sign of
feature 1, their inputs shifted apart along feature 2; fine-tuning the body on B forgets A.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed "
                         "(pip install 'mas_kernels[lightning]'; `make test` installs it)")

from mas_kernels.integrations.lightning import MASCallback  # noqa: E402


def task(feature: int, shift: float, n: int = 192, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    x[:, 2] += shift  # the tasks' inputs lie apart, so one network can solve both
    return torch.utils.data.TensorDataset(x, (x[:, feature] > 0).long())


A, B = task(0, 2.0, seed=1), task(1, -2.0, seed=2)


def loader(data, batch=32):
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def penalty_reference(module, omega, anchors, lam):
    return lam * sum((omega[n] * (p - anchors[n]).pow(2)).sum() for n, p in module.named_parameters() if n in omega)


class Net(pl.LightningModule):
    def __init__(self, sgd=False, reference=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(32, 2), nn.Linear(32, 2)])
        self.task = 0  # the head in use
        self.sgd, self.reference = sgd, reference  # reference: (omega, anchors, lam) for a loss-term penalty

    def forward(self, x):
        return self.heads[self.task](self.body(x))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.reference is not None:
            loss = loss + penalty_reference(self, *self.reference)  # Lightning divides by the accumulation
        return loss

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(module, data, callbacks=(), ckpt_path=None, **kw):
    base = dict(max_epochs=15, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(callbacks=list(callbacks), **{**base, **kw})
    trainer.fit(module, loader(data), ckpt_path=ckpt_path)
    return trainer


def accuracy(module, data, head) -> float:
    x, y = data.tensors
    was, module.task = module.task, head
    with torch.no_grad():
        acc = float((module(x).argmax(1) == y).float().mean())
    module.task = was
    return acc


@pytest.mark.slow
def test_forgetting_is_lower_than_plain_finetuning():
    torch.manual_seed(0)
    module, cb = Net(), MASCallback(lam=0.1)
    fit(module, A, [cb])
    assert cb.mas.num_tasks == 1
    a_after_a = accuracy(module, A, 0)
    module.task = 1
    plain = copy.deepcopy(module)
    fit(plain, B, [])
    fit(module, B, [cb])
    forget_plain, forget_mas = a_after_a - accuracy(plain, A, 0), a_after_a - accuracy(module, A, 0)
    b_plain, b_mas = accuracy(plain, B, 1), accuracy(module, B, 1)
    print(f"\nMLP 8-32-32 + a 2-way head per task, task A accuracy {a_after_a:.3f} after A; after B: forgetting "
          f"plain {forget_plain:.3f}, MAS {forget_mas:.3f}; B accuracy plain {b_plain:.3f}, MAS {b_mas:.3f}",
          file=sys.stderr)
    assert a_after_a > 0.9
    assert forget_mas < 0.5 * forget_plain
    assert b_mas > 0.9


@pytest.mark.parametrize("clip", [None, 0.05])
def test_update_equals_a_loss_term_penalty_with_accumulation_and_clipping(clip):
    """After task A, B with 2 micro-batches per step (and clipping at 0.05): the weights equal those of
    the penalty as a loss term in training_step."""
    torch.manual_seed(0)
    module, cb = Net(sgd=True), MASCallback(lam=5.0)
    fit(module, A, [cb], max_epochs=3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = copy.deepcopy(module)
    ref.reference = ({n: t.clone() for n, t in cb.mas.omega.items()},
                     {n: t.clone() for n, t in cb.mas.anchors.items()}, 5.0)
    kw = dict(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=clip)
    fit(module, B, [cb], **kw)
    fit(ref, B, [], **kw)
    with torch.no_grad():
        worst = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(module.parameters(), ref.parameters()))
        moved = max(float((p - ref.reference[1][n]).abs().max()) for n, p in ref.named_parameters())
    assert moved > 0.05
    assert worst < 1e-5, worst
    assert cb.last_penalty is not None and float(cb.last_penalty) > 0


def test_resume_from_a_checkpoint_gives_the_same_omega(tmp_path):
    """Task A, then B for 2 epochs with a checkpoint after each; a new module and callback resuming B from
    the first checkpoint end with the Omega, theta* and weights of the run that was not interrupted."""
    torch.manual_seed(0)
    module, cb = Net(), MASCallback(lam=3.0)
    fit(module, A, [cb], max_epochs=3)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    fit(module, B, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    assert cb.mas.num_tasks == 2

    torch.manual_seed(7)
    again, cb2 = Net(), MASCallback(lam=3.0)
    fit(again, B, [cb2], max_epochs=2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert cb2.mas.num_tasks == 2
    for name, omega in cb.mas.omega.items():
        torch.testing.assert_close(cb2.mas.omega[name], omega, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(cb2.mas.anchors[name], cb.mas.anchors[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sum(float(v.sum()) for v in cb.mas.omega.values()) > 0


def test_manual_consolidation_and_a_given_loader():
    torch.manual_seed(0)
    module, cb = Net(), MASCallback(consolidate_on="manual", importance="global_batch")
    trainer = fit(module, A, [cb], max_epochs=1)
    assert cb.mas.num_tasks == 0
    cb.end_task(trainer, module, loader(A, batch=64))
    assert cb.mas.num_tasks == 1 and cb.mas.samples_consolidated == len(A)


def test_a_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "mas_kernels.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'mas_kernels\[lightning\]'"):
        import mas_kernels.integrations.lightning  # noqa: F401


def test_options_are_checked_when_made():
    with pytest.raises(ValueError, match="consolidate_on"):
        MASCallback(consolidate_on="epoch")
    with pytest.raises(ValueError, match="combine"):
        MASCallback(combine=2.0)
