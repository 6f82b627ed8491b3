r"""``MASCallback`` for Lightning: importance when a task's training ends, the fused penalty before each
optimizer step, the state in Lightning's checkpoints.

.. code-block:: python

    import lightning as L
    from mas_kernels.integrations.lightning import MASCallback

    mas = MASCallback(lam=1.0)                     # importance="global": the paper's exact rule
    for task_loader in tasks:                      # one fit() per task
        L.Trainer(max_epochs=5, callbacks=[mas]).fit(module, task_loader)
        # on_train_end: Omega <- combine(Omega, this task) over task_loader, theta* <- theta

What runs where (read from Lightning 2.x: ``Precision._after_closure`` and
``MixedPrecision.optimizer_step``):

* **setup** (``stage="fit"``): the ``mas_kernels.MAS`` wrapper is made on
  the LightningModule the first time (names are its ``named_parameters()``).
* **on_before_optimizer_step**: Lightning calls it once per optimizer step,
  after the closure ran forward and backward on the step's last
  micro-batch (with ``accumulate_grad_batches=k`` the loss of each is
  divided by k, so the summed gradient is that of the mean loss; under DDP
  the gradients are all-reduced by then), after ``16-mixed`` AMP has
  unscaled them, and *before* ``gradient_clip_val`` clipping. The callback
  adds ``2 lam Omega (theta - theta*)`` into each ``.grad`` there (one fused
  pass, ``MAS.add_penalty_grad_``): the objective is ``mean task loss + lam
  sum Omega (theta - theta*)^2``, clipped together as a loss term would be;
  on every rank, where theta, theta* and Omega are the same.
* **on_train_end** (``consolidate_on="train_end"``, default): importance over
  the task's batches (``trainer.train_dataloader``, or ``dataloader=``; each
  rank its own, summed over ranks by ``consolidate()``), each batch run as
  ``mas_kernels.MAS`` runs it (a tensor ``module(x)``, a tuple ``module(x[0])``
  with labels ignored, a dict ``module(**x)``; ``forward=`` for anything
  else), then ``consolidate()``. With ``consolidate_on="manual"`` call
  :meth:`end_task` yourself (e.g. after several ``fit`` calls of one task).
* **state_dict / load_state_dict**: Omega, theta*, the counts go into every
  checkpoint Lightning writes and come back with ``fit(ckpt_path=...)``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch

from ..distributed import trainer_group
from ..mas import MAS
from . import check_mas_options, require

_pl = require("lightning.pytorch", "lightning", "mas_kernels.integrations.lightning")

CONSOLIDATE_ON = ("train_end", "manual")


class MASCallback(_pl.Callback):
    """Memory Aware Synapses for a Lightning ``Trainer`` (see the module docstring for what runs when).

    Args:
        lam, importance, combine: as for :class:`mas_kernels.MAS` (``importance`` defaults
            to ``"global"``, the paper's exact per-sample rule).
        dataloader: the batches importance is estimated on (default: the
            Trainer's train dataloader); a callable ``(trainer, module) -> iterable``
            is called when the task ends.
        max_batches: at most this many batches of it (``None``: all).
        consolidate_on: ``"train_end"`` (each ``fit``) or ``"manual"`` (:meth:`end_task`).
        progress: a progress bar while estimating.
        **mas_options: passed on to :class:`mas_kernels.MAS` (``forward``,
            ``output_fn``, ``params``, ``chunk_size``, ``omega_dtype``, ...).

    ``self.mas`` is the wrapper (made at the first ``setup``);
    ``self.last_penalty`` the last step's penalty (a tensor, not synchronized).
    """

    def __init__(self, lam: float = 1.0, importance: str = "global", combine: str | float = "sum", *,
                 dataloader: Iterable | Callable | None = None, max_batches: int | None = None,
                 consolidate_on: str = "train_end", progress: bool = False, **mas_options):
        check_mas_options({"lam": lam, "importance": importance, "combine": combine, **mas_options}, (),
                          "MASCallback")
        if consolidate_on not in CONSOLIDATE_ON:
            raise ValueError(f"MASCallback: consolidate_on={consolidate_on!r} is not one of {CONSOLIDATE_ON}")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches <= 0):
            raise ValueError(f"MASCallback: max_batches={max_batches!r} must be a positive int or None")
        self._mas_options = {"lam": lam, "importance": importance, "combine": combine, **mas_options}
        self.dataloader, self.max_batches = dataloader, max_batches
        self.consolidate_on, self.progress = consolidate_on, progress
        self.mas: MAS | None = None
        self.last_penalty: torch.Tensor | None = None
        self._pending: dict | None = None  # a checkpoint's state, loaded once the wrapper exists

    def _wrapper(self, module: torch.nn.Module) -> MAS:
        if self.mas is None:
            # every rank of a multi-rank Trainer runs this on one model: importance summed over the ranks
            self.mas = MAS(module, **{"process_group": trainer_group(), **self._mas_options})
            if self._pending is not None:
                state, self._pending = self._pending, None
                self.mas.load_state_dict(state)
        elif self.mas.module is not module:
            raise ValueError("MASCallback: this Trainer's LightningModule is not the module this callback's "
                             "importance belongs to; use one callback per module")
        return self.mas

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._wrapper(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mas is not None and self.mas.num_tasks:
            self.last_penalty = self.mas.add_penalty_grad_()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.consolidate_on == "train_end":
            self.end_task(trainer, pl_module)

    def end_task(self, trainer, pl_module, dataloader: Iterable | None = None) -> MAS:
        """Estimate importance over the task's batches and ``consolidate()``; returns the wrapper."""
        mas = self._wrapper(pl_module)
        loader = dataloader if dataloader is not None else self.dataloader
        if loader is None:
            loader = trainer.train_dataloader
        elif callable(loader) and not hasattr(loader, "__iter__"):
            loader = loader(trainer, pl_module)
        if loader is None:
            raise ValueError("MASCallback: no batches to estimate importance on (the Trainer has no train "
                             "dataloader); pass dataloader=")
        if self.max_batches is not None:
            loader = itertools.islice(loader, self.max_batches)
        mas.estimate(loader, progress=self.progress)
        return mas.consolidate()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.mas is None:
            return {} if self._pending is None else self._pending
        return self.mas.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.mas is None:
            self._pending = state_dict
        else:
            self.mas.load_state_dict(state_dict)
