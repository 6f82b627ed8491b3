"""mas_kernels.integrations.transformers.MASCallback on a real transformers.Trainer with a small GPT-2.

Two synthetic next-token tasks over the same 20 tokens: A counts up (t -> t+1), B counts down
(t -> t-1), sequences of 8-12 tokens right-padded to 12, so fine-tuning on B undoes A.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'mas_kernels[transformers]'; `make test` installs it)")

from mas_kernels.integrations.transformers import FILE, MASCallback  # noqa: E402

PAD, LENGTH = 23, 12


def task(step: int, n: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size = int(torch.randint(8, LENGTH + 1, (1,), generator=g))
        start = int(torch.randint(0, 20, (1,), generator=g))
        ids = torch.tensor([(start + step * k) % 20 for k in range(size)] + [PAD] * (LENGTH - size))
        mask = (ids != PAD).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return out


A, B = task(1, seed=1), task(-1, seed=2)


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=16, num_train_epochs=12, learning_rate=1e-2,
                report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**base, **kw})


def train(model, data, out, callbacks=(), optimizers=(None, None), resume=None, **kw):
    trainer = transformers.Trainer(model=model, args=args(out, **kw), train_dataset=data, callbacks=list(callbacks),
                                   optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def loss_on(model, data) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**transformers.default_data_collator(data)).loss)
    model.train(was)
    return loss


@pytest.mark.slow
def test_forgetting_is_lower_than_plain_finetuning(tmp_path):
    """Task A, then task B plain or with MAS (lam 1): A's loss after B rises far less with MAS, and B is
    still learned."""
    model, cb = gpt2(), MASCallback(lam=1.0)
    train(model, A, tmp_path / "a", [cb])
    assert cb.mas.num_tasks == 1 and os.path.isfile(tmp_path / "a" / FILE)
    a_after_a, b_before = loss_on(model, A), loss_on(model, B)
    plain = copy.deepcopy(model)
    train(plain, B, tmp_path / "plain")
    train(model, B, tmp_path / "mas", [cb])
    forget_plain, forget_mas = loss_on(plain, A) - a_after_a, loss_on(model, A) - a_after_a
    b_plain, b_mas = loss_on(plain, B), loss_on(model, B)
    print(f"\nGPT-2 (2 layers, 32 dims), task A loss {a_after_a:.3f} after A; after B: forgetting (rise of A's "
          f"loss) plain {forget_plain:.3f}, MAS {forget_mas:.3f}; B's loss {b_before:.3f} before, plain "
          f"{b_plain:.3f}, MAS {b_mas:.3f}", file=sys.stderr)
    assert forget_mas < 0.5 * forget_plain
    assert b_mas < 0.5 * b_before  # the penalty does not freeze the model


def _penalty_reference(model, omega, anchors, lam):
    return lam * sum((omega[n] * (p - anchors[n]).pow(2)).sum() for n, p in model.named_parameters() if n in omega)


class LossTermTrainer(transformers.Trainer):
    """The reference: the penalty as a loss term, ``lam sum Omega (theta - theta*)^2`` once per optimizer
    step (a share of it in each of the step's micro-batches), clipped by the Trainer with the task loss."""

    def __init__(self, *a, omega, anchors, lam, **kw):
        super().__init__(*a, **kw)
        self.ref = (omega, anchors, lam)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        share = _penalty_reference(model, *self.ref)
        # The Trainer divides the loss by the number of micro-batches unless the model takes the item count.
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return loss + share
        return loss + share / self.current_gradient_accumulation_steps


@pytest.mark.parametrize("clip_penalty", [True, False])
@pytest.mark.slow
def test_update_equals_a_loss_term_penalty_with_accumulation_and_clipping(tmp_path, clip_penalty):
    """After task A, 4 SGD steps on B with 2 micro-batches per step and max_grad_norm 0.05 (every step
    clipped): with clip_penalty (default) the weights equal the loss-term reference's; without it the
    penalty escapes the clipping, and they differ."""
    model, cb = gpt2(), MASCallback(lam=5.0, clip_penalty=clip_penalty)
    train(model, A, tmp_path / "a", [cb], num_train_epochs=2)
    with torch.no_grad():  # start B away from theta*, so the penalty pulls from the first step
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model)
    omega = {n: t.clone() for n, t in cb.mas.omega.items()}
    anchors = {n: t.clone() for n, t in cb.mas.anchors.items()}
    kw = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.05, max_steps=4)
    train(model, B, tmp_path / "mas", [cb], optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None), **kw)
    trainer = LossTermTrainer(model=ref, args=args(tmp_path / "ref", **kw), train_dataset=B,
                              optimizers=(torch.optim.SGD(ref.parameters(), lr=0.5), None),
                              omega=omega, anchors=anchors, lam=5.0)
    trainer.train()
    with torch.no_grad():
        worst = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
        moved = max(float((p - anchors[n]).abs().max()) for n, p in ref.named_parameters())
    assert moved > 0.05
    if clip_penalty:
        assert worst < 1e-5, worst
    else:
        assert worst > 1e-3, worst
    assert trainer.args.max_grad_norm == 0.05 and cb.last_penalty is not None


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_the_same_omega(tmp_path):
    """Task A, then task B saved at steps 3 and 6; a new process (new model, new callback) resuming B from
    checkpoint-3 ends with the Omega, theta* and weights of the run that was not interrupted."""
    model, cb = gpt2(), MASCallback(lam=1.0)
    train(model, A, tmp_path / "a", [cb], num_train_epochs=2)
    out = tmp_path / "b"
    kw = dict(save_strategy="steps", save_steps=3, max_steps=6)
    train(model, B, out, [cb], **kw)
    assert os.path.isfile(out / "checkpoint-3" / FILE) and cb.mas.num_tasks == 2

    again, cb2 = gpt2(seed=7), MASCallback(lam=1.0)
    train(again, B, out, [cb2], resume=str(out / "checkpoint-3"), **kw)
    assert cb2.mas.num_tasks == 2
    for name, omega in cb.mas.omega.items():
        torch.testing.assert_close(cb2.mas.omega[name], omega, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(cb2.mas.anchors[name], cb.mas.anchors[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sum(float(v.sum()) for v in cb.mas.omega.values()) > 0

    os.remove(out / "checkpoint-3" / FILE)
    with pytest.raises(FileNotFoundError, match="no MAS state"):
        train(gpt2(), B, out, [MASCallback()], resume=str(out / "checkpoint-3"), **kw)


def test_a_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mas_kernels.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'mas_kernels\[transformers\]'"):
        import mas_kernels.integrations.transformers  # noqa: F401


def test_options_are_checked_when_made():
    with pytest.raises(ValueError, match="importance"):
        MASCallback(importance="fisher")
    with pytest.raises(TypeError, match="unknown MAS option"):
        MASCallback(lamda=1.0)
    with pytest.raises(ValueError, match="max_batches"):
        MASCallback(max_batches=0)


def test_the_penalty_is_added_to_unscaled_gradients():
    """fp16 AMP: gradients still scaled by the GradScaler when the hook runs are unscaled first, so the
    step's unscaling does not divide the penalty's gradient by the loss scale."""
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    cb = MASCallback(lam=2.0, importance="global_batch")
    cb._wrapper(model)
    cb.mas.estimate([{"input": torch.randn(4, 3)}]).consolidate()
    with torch.no_grad():
        model.weight.add_(1.0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.randn(5, 3)).sum()).backward()
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    cb.on_pre_optimizer_step(SimpleNamespace(max_grad_norm=0.0), None, None, model=model,
                             optimizer=SimpleNamespace(scaler=scaler, optimizer=inner))
    for n, p in model.named_parameters():
        expected = scaled[n] / 1024.0 + 2 * 2.0 * cb.mas.omega[n] * (p.detach() - cb.mas.anchors[n])
        torch.testing.assert_close(p.grad, expected, msg=n)
    scaler.step(inner)  # the scaler knows they are unscaled: no second division


def test_mas_penalty_reaches_the_log_history(tmp_path):
    """The Trainer stores a copy of each step's logs in state.log_history before the callbacks' on_log;
    the penalty must be in that copy (it was only printed)."""
    model, cb = gpt2(), MASCallback(lam=1.0)
    train(model, A, tmp_path / "a", [cb], num_train_epochs=1)
    trainer = train(model, B, tmp_path / "b", [cb], num_train_epochs=2, logging_strategy="steps", logging_steps=1)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("mas_penalty" in entry for entry in logged), trainer.state.log_history
    assert all(entry["mas_penalty"] >= 0 for entry in logged) and logged[-1]["mas_penalty"] > 0
    # The last logged step's penalty is the one the callback computed for that step.
    assert logged[-1]["mas_penalty"] == pytest.approx(float(cb.last_penalty))
