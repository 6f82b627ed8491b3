r"""``MASPlugin`` for Avalanche: a drop-in for ``avalanche.training.plugins.MASPlugin`` (Avalanche 0.6).

.. code-block:: python

    from avalanche.training import Naive
    from mas_kernels.integrations.avalanche import MASPlugin   # instead of avalanche.training.plugins

    strategy = Naive(model, optimizer, criterion, train_mb_size=32, plugins=[MASPlugin(lambda_reg=1.0, alpha=0.5)])

What Avalanche's plugin does, and this one with its defaults (read from
Avalanche 0.6.0's ``avalanche/training/plugins/mas.py``):

* importance at the end of each experience (``after_training_exp``), in
  train mode, over ``DataLoader(experience.dataset,
  batch_size=strategy.train_mb_size)`` (no shuffle; the last batch may be
  short), iterated once: the same draws from the global RNG (the loader's
  seed, dropout masks), so the run goes on with the same random stream, each batch ``[x, y, t]`` run as ``avalanche_forward(model, x,
  t)`` (``t = batch[-1]``); per batch ``loss = ||out||^2`` summed over dim 1,
  averaged over the batch and over any dims past 1, and

  ``Omega_new = (1/n_b) sum_b |d loss_b / d theta|``  (n_b batches);

* across experiences ``Omega = alpha Omega_old + (1 - alpha) Omega_new``
  (the first: ``Omega_new``); a parameter that grew (a head gaining
  classes) keeps its old entries, its new ones mixing in from zero; a
  parameter first seen in this experience takes ``Omega_new`` whole;
* theta* = the parameters at the end of each experience; from the second
  experience on, the penalty ``lambda_reg * sum Omega (theta - theta*)^2``.

The difference: Avalanche adds the penalty to the loss before backward (a
temporary per parameter, and autograd through them); this plugin adds its
gradient ``2 lambda_reg Omega (theta - theta*)`` into ``.grad`` after
backward (``after_backward``), in one fused pass (``MAS.add_penalty_grad_``),
and adds the penalty's value to ``strategy.loss`` then, so the logged loss is
Avalanche's. The parameters' update is the same.

The plugin pickles (Avalanche checkpoints a strategy by pickling it), its
wrapper and state included; unpickled with its strategy's model, it goes on
where it was.

``importance="global"`` gives the paper's exact rule instead,
``Omega_new = (1/N) sum_k |d ||F(x_k)||^2 / d theta|`` over the N samples
(abs per sample, in eval mode; the batch size no longer matters), and
``"local"`` the Hebbian rule (see ``mas_kernels.MAS``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from ..mas import MAS
from ..options import check_lam
from ..state import check_combine, leading
from . import check_mas_options, require

_plugins = require("avalanche.training.plugins", "avalanche", "mas_kernels.integrations.avalanche")
_model_utils = require("avalanche.models.utils", "avalanche", "mas_kernels.integrations.avalanche")
avalanche_forward = _model_utils.avalanche_forward

_RESERVED = ("lam", "combine", "importance", "normalization", "forward")


def _forward(model: torch.nn.Module, batch) -> Any:
    """Avalanche's: ``[x, y, t]`` or ``[x, t]`` -> ``avalanche_forward(model, x, batch[-1])``."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"MASPlugin: a batch of the experience's dataset is [x, y, t] or [x, t]; got "
                         f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")
    return avalanche_forward(model, batch[0], batch[-1])


def _identity(out):
    return out


class _PerPosition:
    """``output_fn`` scaled so that ``||out||^2`` is also averaged over the dims past 1 (Avalanche's
    ``norm(out, dim=1).pow(2).mean()`` averages over dim 0 and those dims). A class, not a closure:
    Avalanche checkpoints a strategy, plugins included, by pickling it."""

    def __init__(self, output_fn: Callable):
        self.output_fn = output_fn

    def __call__(self, out):
        out = self.output_fn(out)
        if isinstance(out, torch.Tensor) and out.dim() > 2:
            out = out / math.sqrt(math.prod(out.shape[2:]))
        return out


class _OneIterator:
    """``loader`` iterated once, with its length: ``iter()`` gives the same iterator every time.

    Avalanche's plugin iterates its DataLoader once, and making a DataLoader
    iterator draws a seed from the global RNG; a consumer that calls
    ``iter()`` twice (tqdm.auto does: once to test the iterable, once to
    iterate it) would draw twice, and the run would continue on another random
    stream than with Avalanche's plugin (a different next experience).
    """

    def __init__(self, loader):
        self._loader = loader
        self._it = None

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        if self._it is None:
            self._it = iter(self._loader)
        return self._it


class MASPlugin(_plugins.SupervisedPlugin):
    """Memory Aware Synapses for an Avalanche strategy, Avalanche's defaults, a fused penalty.

    Args:
        lambda_reg: penalty strength (``lambda_reg * sum Omega (theta - theta*)^2``).
        alpha: weight of the previous importance, ``Omega = alpha old + (1 - alpha) new``.
        verbose: print "Computing importance" and show a progress bar, as Avalanche's does.
        importance: ``"global_batch"`` (default: Avalanche's, the abs of each
            batch's summed gradient), ``"global"`` (the paper's exact
            per-sample rule) or ``"local"`` (Hebbian).
        normalization: ``"avalanche"`` (the mean over batches of each batch's
            mean) or ``"samples"`` (``1/N`` over samples). Default: ``"avalanche"``
            for ``"global_batch"`` (Avalanche's importance exactly),
            ``"samples"`` otherwise (the paper's rule).
        train_mode: run the importance passes in train mode (dropout,
            BatchNorm batch statistics, running statistics updated); default:
            on for ``"global_batch"`` (as Avalanche), off for the per-sample rules.
        **mas_options: passed on to :class:`mas_kernels.MAS` (``output_fn``,
            ``params``, ``chunk_size``, ``omega_dtype``, ...).

    Attributes, as Avalanche's plugin has them: ``importance`` and ``params``
    (Omega and theta* by parameter name, or None before the first
    experience ends), ``alpha``; and ``mas``, the wrapper.
    """

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5, verbose: bool = False, *,
                 importance: str = "global_batch", normalization: str | None = None,
                 train_mode: bool | None = None, **mas_options):
        super().__init__()
        self._lambda = check_lam(lambda_reg, "MASPlugin")
        alpha = check_combine(alpha, "MASPlugin")
        if isinstance(alpha, str):
            raise ValueError(f"MASPlugin: alpha={alpha!r} must be a float in [0, 1]")
        self.alpha = alpha
        self.verbose = verbose
        if normalization is None:
            normalization = "avalanche" if importance == "global_batch" else "samples"
        check_mas_options(mas_options, _RESERVED, "MASPlugin")
        check_mas_options({"importance": importance, "normalization": normalization}, (), "MASPlugin")
        self.rule, self.normalization = importance, normalization
        self.train_mode = importance == "global_batch" if train_mode is None else bool(train_mode)
        output_fn = mas_options.pop("output_fn", None) or _identity
        if normalization == "avalanche":
            output_fn = _PerPosition(output_fn)
        self._mas_options = {**mas_options, "output_fn": output_fn}
        self.mas: MAS | None = None
        self._known: set[str] = set()  # the names Omega had at the end of the last experience

    # ------------------------------------------------------------- Avalanche's attributes
    @property
    def importance(self) -> dict[str, torch.Tensor] | None:
        """Omega by parameter name (None before the first experience ends)."""
        return None if self.mas is None or self.mas.num_tasks == 0 else self.mas.omega

    @property
    def params(self) -> dict[str, torch.Tensor] | None:
        """theta*, the parameters at the end of the last experience (None before)."""
        return None if self.mas is None or self.mas.num_tasks == 0 else self.mas.anchors

    def _wrapper(self, model: torch.nn.Module) -> MAS:
        if self.mas is None:
            # combine=0.0: consolidate() leaves this experience's importance in Omega, and the
            # plugin mixes in the old one as Avalanche does (a parameter new to it taking the new
            # importance whole, which a wrapper-side alpha cannot tell).
            self.mas = MAS(model, lam=self._lambda, importance=self.rule, combine=0.0,
                           normalization=self.normalization, forward=_forward, **self._mas_options)
        elif self.mas.wrapper is not model:
            raise ValueError("MASPlugin: strategy.model is not the model this plugin's importance belongs to; "
                             "keep one model object across experiences (Avalanche adapts it in place)")
        return self.mas

    # ------------------------------------------------------------------------ hooks
    def after_backward(self, strategy, **kwargs):
        """From the second experience on: ``.grad += 2 lambda_reg Omega (theta - theta*)``; the loss
        (for logging) gets the penalty's value."""
        if strategy.clock.train_exp_counter == 0:
            return
        if self.mas is None or self.mas.num_tasks == 0:
            raise ValueError("Importance is not available")
        value = self.mas.add_penalty_grad_()
        strategy.loss = strategy.loss + value.detach().to(strategy.loss.dtype)

    def after_training_exp(self, strategy, **kwargs):
        """Importance over the experience's dataset, mixed with the old; theta* <- theta."""
        if not strategy.experience:
            raise ValueError("Current experience is not available")
        dataset = strategy.experience.dataset
        if dataset is None:
            raise ValueError("Current dataset is not available")
        mas = self._wrapper(strategy.model)
        loader = DataLoader(dataset, batch_size=strategy.train_mb_size,
                            collate_fn=getattr(dataset, "collate_fn", None))
        if self.verbose:
            print("Computing importance")
        mas.estimate(_OneIterator(loader), progress=self.verbose, train_mode=self.train_mode)
        # Avalanche's importance holds the names seen at the end of an experience: a head added since
        # (tracked here at zero importance from when it appeared) is new to it.
        old = {name: omega.clone() for name, omega in mas.omega.items() if name in self._known}
        first = mas.num_tasks == 0
        mas.consolidate()
        self._known = set(mas.omega)
        if first:
            return
        with torch.no_grad():
            for name, omega in mas.omega.items():
                if name in old:  # else: first seen now, Omega_new whole (Avalanche's)
                    prev = old[name]
                    omega.mul_(1.0 - self.alpha)[leading(tuple(prev.shape))].add_(prev, alpha=self.alpha)
