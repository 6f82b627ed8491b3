r"""``MASCallback`` for ``transformers.Trainer``: importance at the end of each task, the fused penalty
at each optimizer step, the state beside the Trainer's checkpoints.

.. code-block:: python

    from mas_kernels.integrations.transformers import MASCallback

    mas = MASCallback(lam=1.0)                        # importance="global": the paper's exact rule
    for task_dataset in tasks:                        # one Trainer.train() per task
        trainer = Trainer(model=model, args=args, train_dataset=task_dataset, callbacks=[mas])
        trainer.train()                               # penalty from the second task on; at the end:
                                                      # Omega <- combine(Omega, this task), theta* <- theta

A task is one ``trainer.train()`` (a new Trainer per task, or the same one
with a new ``train_dataset``). What runs where (read from transformers 5.24's
``Trainer._inner_training_loop``):

* **on_train_begin**: the ``mas_kernels.MAS`` wrapper is made on the
  Trainer's (unwrapped) model the first time; when the Trainer resumes
  (``state.global_step > 0``) the state is read back from
  ``<output_dir>/checkpoint-<step>/mas.safetensors``.
* **the penalty, once per optimizer step**: the Trainer runs forward and
  backward for each of the ``gradient_accumulation_steps`` micro-batches
  (the loss divided so that the summed gradient is that of the mean loss;
  under DDP the last micro-batch's backward all-reduces, the others run
  under ``no_sync``), then clips (``accelerator.clip_grad_norm_``, which
  first unscales fp16 gradients), then calls ``on_pre_optimizer_step``, then
  ``optimizer.step()``. There the callback adds ``2 lam Omega (theta -
  theta*)`` into each ``.grad`` (one fused pass, ``MAS.add_penalty_grad_``):
  once per step, so the objective is ``mean task loss + lam sum Omega
  (theta - theta*)^2`` whatever the accumulation (a loss term added per
  micro-batch would count it once per micro-batch where the Trainer scales
  the loss by the number of items rather than by the steps); on every rank
  after the all-reduce (theta, theta* and Omega are the same on every rank,
  so the penalty's gradient is too; it is not averaged again); on unscaled
  gradients (the norm the Trainer measures at every step, also with
  ``max_grad_norm=0``, unscales fp16 ones; were they still scaled, the
  callback unscales them first).
* **clipping**: since the Trainer clips *before* ``on_pre_optimizer_step``,
  with ``clip_penalty=True`` (default) and ``max_grad_norm > 0`` the callback
  takes the step's clipping over: it sets ``args.max_grad_norm`` to 0 from
  ``on_step_begin`` until ``on_pre_optimizer_step`` (the Trainer then only
  measures the norm it logs, of the task gradient), restores it there, adds
  the penalty's gradient and clips the sum with
  ``torch.nn.utils.clip_grad_norm_``: the update is that of a loss-term
  penalty, clipped together with the task loss. ``clip_penalty=False``
  leaves the Trainer's clipping alone (the task gradient is clipped, the
  penalty's is added after). DeepSpeed (which clips inside its own step)
  and FSDP (``mas_kernels.MAS`` refuses sharded parameters) are refused.
* **on_train_end**: importance over the task's training batches (the
  Trainer's train dataloader, or ``dataloader=``; each rank its own shard,
  summed over ranks by ``consolidate()``), labels dropped (``label_names``:
  MAS needs no labels), each batch run as ``model(**batch)``; ``output_fn``
  picks the tensor (default: ``logits``), whose padded positions
  (``attention_mask == 0``) are zeroed with ``mask_padding=True``; then
  ``consolidate()``, and the state is saved to ``<output_dir>/mas.safetensors``.
* **on_save**: the state goes beside the Trainer's checkpoint, in
  ``<output_dir>/checkpoint-<step>/mas.safetensors``.
* **on_log**: the last step's penalty is logged as ``mas_penalty``, also in
  ``trainer.state.log_history`` (which the Trainer fills before ``on_log``).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable

import torch

from ..distributed import trainer_group
from ..mas import MAS
from . import check_mas_options, require

_transformers = require("transformers", "transformers", "mas_kernels.integrations.transformers")

FILE = "mas.safetensors"
_RESERVED = ("forward",)
_LABELS = ("labels", "label", "label_ids")


def logits(out: Any) -> torch.Tensor:
    """The logits of a transformers model output (``ModelOutput``, dict, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    got = getattr(out, "logits", None)
    if isinstance(got, torch.Tensor):
        return got
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"MASCallback: the model returned a {type(out).__name__} without logits; pass "
                    "output_fn= to pick the output tensor whose squared L2 norm defines importance")


def _unscaled(optimizer) -> None:
    """Unscale fp16 gradients held by accelerate's ``GradScaler`` if nothing has yet this step.

    transformers 5.x measures the gradient norm at every step (``accelerator.clip_grad_norm_``, also
    with ``max_grad_norm=0``), which unscales them before ``on_pre_optimizer_step``; were they still
    scaled, the penalty's gradient added now would be divided by the loss scale in the step.
    """
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(inner)]["stage"] is OptState.READY:
        scaler.unscale_(inner)


class MASCallback(_transformers.TrainerCallback):
    """Memory Aware Synapses for ``transformers.Trainer`` (see the module docstring for what runs when).

    Args:
        lam, importance, combine: as for :class:`mas_kernels.MAS` (``importance`` defaults
            to ``"global"``, the paper's exact per-sample rule).
        dataloader: the batches importance is estimated on at the end of each
            task (default: the Trainer's train dataloader); a callable
            ``(trainer_kwargs) -> iterable`` is called then.
        max_batches: at most this many batches of it (``None``: all).
        output_fn: picks the output tensor (default: :func:`logits`).
        label_names: batch keys dropped before the forward (default: the
            Trainer's ``args.label_names``, else ``labels``, ``label``, ``label_ids``).
        mask_padding: zero the output at positions whose ``attention_mask`` is 0
            (when the batch has one of the output's first two dims).
        clip_penalty: clip the task gradient and the penalty's together, as
            for a loss term (see the module docstring).
        save: write the state to ``<output_dir>/mas.safetensors`` after each task.
        progress: a progress bar while estimating.
        **mas_options: passed on to :class:`mas_kernels.MAS` (``params``, ``chunk_size``, ``omega_dtype``, ...).

    ``self.mas`` is the wrapper (made at the first ``on_train_begin``);
    :meth:`load` reads a saved state (applied when the wrapper is made, if
    it is not made yet), e.g. to start the next task in a new process.
    """

    def __init__(self, lam: float = 1.0, importance: str = "global", combine: str | float = "sum", *,
                 dataloader: Iterable | Callable | None = None, max_batches: int | None = None,
                 output_fn: Callable | None = None, label_names: Iterable[str] | None = None,
                 mask_padding: bool = True, clip_penalty: bool = True, save: bool = True, progress: bool = False,
                 **mas_options):
        check_mas_options({"lam": lam, "importance": importance, "combine": combine, **mas_options}, _RESERVED,
                          "MASCallback")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches <= 0):
            raise ValueError(f"MASCallback: max_batches={max_batches!r} must be a positive int or None")
        self._mas_options = {"lam": lam, "importance": importance, "combine": combine, **mas_options}
        self.output_fn = output_fn or logits
        self.dataloader, self.max_batches = dataloader, max_batches
        self.label_names = None if label_names is None else tuple(label_names)
        self._labels = set(self.label_names or _LABELS)  # the Trainer's label_names replace it when given
        self.mask_padding, self.clip_penalty, self.save, self.progress = mask_padding, clip_penalty, save, progress
        self.mas: MAS | None = None
        self.last_penalty: torch.Tensor | None = None
        self._pending: str | None = None  # a state file to load once the wrapper exists
        self._max_norm: float | None = None  # args.max_grad_norm, while the callback holds it

    # ---------------------------------------------------------------- state
    def load(self, path: str | os.PathLike) -> None:
        """Read a state written by this callback (a ``mas.safetensors`` file, or a folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, FILE)
        if self.mas is None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"MASCallback.load: no MAS state at {path!r}")
            self._pending = path
        else:
            self.mas.load(path)

    def _wrapper(self, model: torch.nn.Module) -> MAS:
        if self.mas is None:
            # every rank of a multi-rank Trainer runs this on one model: importance summed over the ranks
            self.mas = MAS(model, output_fn=self.output_fn, forward=self._forward,
                           **{"process_group": trainer_group(), **self._mas_options})
            if self._pending is not None:
                path, self._pending = self._pending, None
                self.mas.load(path)
        elif self.mas.module is not model:
            raise ValueError("MASCallback: the Trainer's model is not the model this callback's importance "
                             "belongs to; use one callback per model (or load its state into a new callback)")
        return self.mas

    # --------------------------------------------------------------- batches
    def _forward(self, model: torch.nn.Module, batch) -> torch.Tensor:
        if not isinstance(batch, dict):
            raise TypeError(f"MASCallback: expected dict batches (what the Trainer's collators give), got "
                            f"{type(batch).__name__}; pass dataloader= with dict batches")
        drop = self._labels
        inputs = {k: v for k, v in batch.items() if k not in drop}
        # The mask the model is given (MAS runs this forward on sub-batches of the batch, too).
        seen: dict = {}
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            out = self.output_fn(model(**inputs))
        finally:
            handle.remove()
        mask = seen.get("attention_mask", inputs.get("attention_mask"))
        if (self.mask_padding and isinstance(mask, torch.Tensor) and isinstance(out, torch.Tensor)
                and out.dim() >= 2 and tuple(mask.shape) == tuple(out.shape[:2])):
            out = out * mask.to(out.dtype).view(*mask.shape, *([1] * (out.dim() - 2)))
        return out

    # ----------------------------------------------------------------- hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise ValueError("MASCallback: DeepSpeed clips and steps inside its engine, where the penalty's "
                             "gradient cannot be added; train without DeepSpeed (DDP works)")
        self._labels = set(self.label_names if self.label_names is not None
                           else (getattr(args, "label_names", None) or _LABELS))
        mas = self._wrapper(model)
        if state.global_step > 0:  # resuming: the state saved beside that checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"MASCallback: the Trainer resumes at step {state.global_step}, but there is no MAS state at "
                    f"{path!r} (it is written there by on_save). For a checkpoint outside output_dir, load its "
                    "state with callback.load(checkpoint_dir) and resume from the output_dir's copy")
            mas.load(path)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.clip_penalty and self.mas is not None and self.mas.num_tasks and args.max_grad_norm \
                and args.max_grad_norm > 0:
            self._max_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def _restore(self, args) -> float | None:
        max_norm, self._max_norm = self._max_norm, None
        if max_norm is not None:
            args.max_grad_norm = max_norm
        return max_norm

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        max_norm = self._restore(args)
        if self.mas is None or self.mas.num_tasks == 0:
            return
        _unscaled(optimizer)
        self.last_penalty = self.mas.add_penalty_grad_()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    def on_step_end(self, args, state, control, **kwargs):
        self._restore(args)  # before the Trainer saves its arguments with a checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.last_penalty is None or "loss" not in logs:
            return
        value = float(self.last_penalty)
        logs["mas_penalty"] = value  # for the callbacks after this one
        # The Trainer stored a copy of these logs in state.log_history before calling on_log: that
        # entry (this step's, with the same loss) gets the value too.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
            last["mas_penalty"] = value

    def on_save(self, args, state, control, **kwargs):
        if self.mas is not None:
            self.mas.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", FILE))

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._restore(args)
        mas = self._wrapper(model)
        loader = self.dataloader if self.dataloader is not None else train_dataloader
        if callable(loader) and not hasattr(loader, "__iter__"):
            loader = loader({"model": model, "train_dataloader": train_dataloader, **kwargs})
        if loader is None:
            raise ValueError("MASCallback: no batches to estimate importance on (the Trainer has no train "
                             "dataloader); pass dataloader=")
        if self.max_batches is not None:
            loader = itertools.islice(loader, self.max_batches)
        mas.estimate(loader, progress=self.progress)
        mas.consolidate()
        if self.save:
            os.makedirs(args.output_dir, exist_ok=True)
            mas.save(os.path.join(args.output_dir, FILE))
