r"""``MAS``: Memory Aware Synapses on an ``nn.Module`` in three lines.

.. code-block:: python

    mas = mk.MAS(model, lam=1.0, importance="local")
    mas.estimate(loader)            # or: with mas.accumulating(): model(x) ...
    mas.consolidate()               # Omega <- combine(Omega, this task), theta* <- theta
    loss = task_loss + mas.penalty()

Importance (N = samples seen since the last ``consolidate``; extra dims of a
sample such as sequence or spatial positions are summed within the sample):

* ``"local"`` (Hebbian): Linear ``Omega_W = (1/N) sum_k |y_k| |x_k|^T``, bias
  ``(1/N) sum_k |y_k|``; Conv1d/2d/3d the same over positions. Forward only.
* ``"global"`` (the paper's Eq. 2, exact): ``Omega = (1/N) sum_k |d ||F(x_k)||_2^2 / d theta|``.
* ``"global_batch"`` (the released code): ``(1/N) sum_b |sum_{k in b} g_k|``.

Across tasks (``combine``): ``"sum"`` (released code), ``"mean"`` (N-weighted
running mean) or a float ``alpha``: ``alpha * old + (1 - alpha) * new``
(Avalanche, FACIL). Penalty: ``lam * sum Omega (theta - theta*)^2`` (FACIL
halves it).

The class is a facade over the rooms that do the work: ``_model`` (which
parameters), ``estimators`` (the rules), ``session`` (hooks per estimation),
``state`` (Omega, theta*, accumulator), ``regularizer`` (the penalty),
``checkpoint`` (the file) and ``distributed`` (sums over ranks).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import __version__, checkpoint, distributed
from ._model import TrackedParams, default_output, modes, remove_handles, unwrap
from .estimators import BatchRule, ExactRule, LocalRule, Plan
from .regularizer import Regularizer
from .session import Session
from .state import ImportanceState, check_combine

IMPORTANCE = ("local", "global", "global_batch")
UNCOVERED = ("global", "skip", "error")
NORMALIZATION = ("samples", "avalanche")


class MAS:
    r"""Memory Aware Synapses importance, consolidation and penalty for ``model``.

    Args:
        model: the network; DDP / DataParallel / ``torch.compile`` wrappers are
            unwrapped, and parameter names are those of the inner module.
        lam: penalty strength lambda in ``lam * sum Omega (theta - theta*)^2``.
        importance: ``"local"``, ``"global"`` or ``"global_batch"`` (module docstring).
        combine: ``"sum"``, ``"mean"`` or a float alpha in [0, 1].
        output_fn: picks the output tensor from what the model returns
            (default: the output itself, which must be a tensor).
        uncovered: for ``"local"``, what to do with parameters that no local
            rule covers (not the weight/bias of a Linear or ConvNd, or shared
            between modules): ``"global"`` (exact per-sample global rule),
            ``"skip"`` (zero importance) or ``"error"``. Listed in ``self.uncovered``.
        post_activation: for ``"local"``, applied to each layer's output ``y``
            before the rule (e.g. ``torch.relu``): one callable for every layer,
            or ``{module_name: callable}``.
        include_frozen: also track parameters with ``requires_grad=False``.
        chunk_size: at most this many samples per chunk of per-sample scratch
            (``None``: as many as ``memory_budget`` allows).
        memory_budget: bytes of per-sample scratch the exact rule may hold at
            once (default 256 MiB): per-sample gradients, unfolded conv patches.
        forward: ``forward(model, batch) -> output`` runs the model on one of
            ``estimate()``'s batches (e.g. ``lambda m, b: m(b[0], b[2])`` for a
            task label); default: a tensor ``model(batch)``, a tuple or list
            ``model(batch[0])`` (labels ignored), a dict ``model(**batch)``.
        process_group: for ``torch.distributed``: ``consolidate()`` all-reduces
            importance numerators and sample counts over it (default group when
            initialized).
        normalization: how a task's numerators become its importance:
            ``"samples"`` (default): ``(1/N) sum_k`` over the task's N samples;
            ``"avalanche"``: the mean over batches of each batch's mean,
            ``(1/n_b) sum_b (1/B_b) sum_{k in b}`` (Avalanche's MASPlugin; the
            two differ when batches differ in size, e.g. a short last batch).
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        importance: str = "local",
        combine: str | float = "sum",
        *,
        output_fn: Callable | None = None,
        uncovered: str = "global",
        post_activation: Callable | dict | None = None,
        include_frozen: bool = False,
        chunk_size: int | None = None,
        process_group=None,
        normalization: str = "samples",
        memory_budget: int | None = None,
        forward: Callable | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAS: model must be an nn.Module, got {type(model).__name__}")
        if importance not in IMPORTANCE:
            raise ValueError(f"MAS: importance={importance!r} is not one of {IMPORTANCE}")
        if uncovered not in UNCOVERED:
            raise ValueError(f"MAS: uncovered={uncovered!r} is not one of {UNCOVERED}")
        if normalization not in NORMALIZATION:
            raise ValueError(f"MAS: normalization={normalization!r} is not one of {NORMALIZATION}")
        self.normalization = normalization
        self.combine = check_combine(combine)
        self._lam = float(lam)
        self.importance = importance
        self.output_fn = output_fn or default_output
        self.uncovered_policy = uncovered
        self.post_activation = post_activation
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.forward = forward
        self.process_group = process_group
        self.wrapper = model
        self.module = unwrap(model)
        self._tracked = TrackedParams(self.module, include_frozen)
        self._handles: list = []  # the open session's hooks (removed if this wrapper is collected mid-session)
        self._build(self._tracked.params)
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------ parameters
    def _build(self, params: dict[str, nn.Parameter], old: ImportanceState | None = None) -> None:
        """The state, the plan of rules and the penalty's lists for ``params`` (old values kept by name)."""
        distributed.check_unsharded(self.module, params)  # FSDP1 / FSDP2 / tensor parallel: a clear error
        state = ImportanceState(params, old)
        self._regularizer = Regularizer("MAS", list(params.values()), [state.anchors[n] for n in params],
                                        [state.omega[n] for n in params], self._lam)
        self._params, self._state_, self._plan = params, state, Plan(self.module, params)

    @property
    def _state(self) -> ImportanceState:
        """The state, rebuilt first if parameters were added, removed or replaced since."""
        params = self._tracked.changed()
        if params is not None:
            self._build(params, self._state_)
        return self._state_

    @property
    def lam(self) -> float:
        """lambda, the penalty strength (may be changed between steps)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = self._regularizer.lam = float(value)

    @property
    def include_frozen(self) -> bool:
        return self._tracked.include_frozen

    @property
    def omega(self) -> dict[str, torch.Tensor]:
        """Importance per parameter name (fp32 views into the flat buffer)."""
        return self._state.omega.views

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        """theta*, the parameters at the last ``consolidate()``."""
        return self._state.anchors.views

    @property
    def covered(self) -> list[str]:
        """Parameters a layer's own rule covers (for ``"local"``: the Hebbian rule)."""
        self._state
        return self._plan.covered

    @property
    def uncovered(self) -> list[str]:
        """Parameters no layer rule covers (for ``"local"``, handled as ``uncovered=`` says)."""
        self._state
        return self._plan.uncovered

    @property
    def num_samples(self) -> int:
        """Samples seen since the last ``consolidate()``."""
        return self._state.num_samples

    @property
    def samples_consolidated(self) -> int:
        """Samples in all consolidated tasks."""
        return self._state.samples_consolidated

    @property
    def num_tasks(self) -> int:
        """How many times ``consolidate()`` ran."""
        return self._state.num_tasks

    # ------------------------------------------------------------ estimation
    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device if self._params else torch.device("cpu")

    def _exact(self) -> ExactRule:
        return ExactRule(self.module, self._params, self._plan, self.output_fn, self.memory_budget, self.chunk_size)

    def _rule(self):
        if self.importance == "local":
            return LocalRule(self._plan, self.post_activation)
        if self.importance == "global_batch":
            return BatchRule(self.module, self._params, self._plan, self.output_fn)
        return self._exact()

    def _extra(self) -> tuple[ExactRule, list[str]] | None:
        """For ``"local"``: the exact rule for the parameters no local rule covers, as ``uncovered=`` says."""
        if self.importance != "local" or not self._plan.uncovered or self.uncovered_policy == "skip":
            return None
        if self.uncovered_policy == "error":
            raise ValueError(
                f"MAS(importance='local', uncovered='error'): no local rule covers {self._plan.uncovered}; "
                "pass uncovered='global' (exact per-sample rule) or 'skip' (zero importance)"
            )
        return self._exact(), self._plan.uncovered

    def _session(self) -> Session:
        """Hooks for one estimation session; ``requires_grad`` restored after.

        Estimation never writes ``.grad`` (it uses ``torch.autograd.grad`` and
        ``torch.func``), so the user's own backward passes inside
        ``accumulating()`` keep their effect.
        """
        state = self._state
        return Session(self.module, self._params, state, self._rule(), self._extra(), self._handles,
                       per_batch_mean=self.normalization == "avalanche")

    @contextlib.contextmanager
    def accumulating(self):
        """Accumulate importance from every forward pass of the model inside the block.

        ``"local"`` uses the activations of the user's own forward (no extra
        work beyond one ``abs_outer`` per layer; fine under ``torch.no_grad()``);
        the global rules run their own forward/backward on each batch's input in
        eval mode. N grows by each input's first dimension.
        """
        with self._session():
            yield self

    def _call(self, batch) -> Callable[[nn.Module], Any]:
        """How to run the model on one of ``estimate()``'s batches (on the parameters' device)."""
        device = self._device()
        batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
        if self.forward is not None:
            return lambda m: self.forward(m, batch)

        def hinted(call):
            def run(m):
                try:
                    return call(m)
                except TypeError as exc:
                    if "argument" not in str(exc):
                        raise
                    raise TypeError(
                        f"MAS.estimate: calling the model on the batch failed ({exc}); a tuple/list batch runs "
                        "model(batch[0]) and a dict batch model(**batch). Pass forward=lambda model, batch: "
                        "model(...) to say how, e.g. forward=lambda m, b: m(b[0], b[2]) for task labels"
                    ) from exc
            return run

        if isinstance(batch, torch.Tensor):
            return hinted(lambda m: m(batch))
        if isinstance(batch, dict):
            return hinted(lambda m: m(**batch))
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return hinted(lambda m: m(batch[0]))
        raise TypeError(
            f"MAS.estimate: a batch is a tensor, a tuple/list whose first item is the input tensor, or a dict "
            f"of keyword arguments; got {type(batch).__name__}. Pass forward=lambda model, batch: ... to say "
            "how to run the model on it"
        )

    def estimate(self, batches: Iterable, progress: bool = False, *, train_mode: bool = False) -> "MAS":
        """Accumulate importance over ``batches``, an iterable of batches (e.g. a DataLoader).

        Each batch is run as ``forward=`` says (default: a tensor, the first
        item of a tuple/list, labels ignored, or a dict of keyword arguments).
        Runs the model in eval mode unless ``train_mode``. The model's mode and
        every ``.grad`` are restored afterwards.
        """
        from tqdm.auto import tqdm

        if isinstance(batches, torch.Tensor):
            raise TypeError(
                f"MAS.estimate: got a tensor of shape {tuple(batches.shape)}; pass an iterable of batches, "
                "e.g. [x] for one batch, or a DataLoader"
            )
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
        with self._session() as session, modes(self.module, train_mode):
            for batch in tqdm(batches, total=total, disable=not progress, desc=f"MAS {self.importance}",
                              unit="batch"):
                session.run(self._call(batch), eval_mode=not train_mode)
        return self

    # --------------------------------------------------------- across tasks
    def consolidate(self) -> "MAS":
        """Fold this task's importance into Omega and snapshot theta* (the anchors).

        ``new = accumulator / N``; then ``sum``: ``Omega += new``; ``mean``:
        ``Omega = (N_old Omega + N new) / (N_old + N)``; alpha:
        ``Omega = alpha Omega + (1 - alpha) new`` (``Omega = new`` for the first
        task). Under ``torch.distributed`` the numerators and N are all-reduced
        first, so every rank gets the Omega of the union of the data.
        """
        state = self._state
        n, n_batches = distributed.all_reduce_importance(state.acc, (state.num_samples, state.num_batches),
                                                         self.process_group)
        if n == 0:
            raise RuntimeError(
                "MAS.consolidate(): no samples seen since the last consolidate; call estimate() "
                "or run forward passes inside accumulating() first"
            )
        state.fold(n, self.combine, divisor=n_batches if self.normalization == "avalanche" else n)
        state.snapshot(self._params)
        return self

    # --------------------------------------------------------------- penalty
    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters (one fused op)."""
        if self._state.num_tasks == 0:
            return self._regularizer.zero()
        return self._regularizer.penalty()

    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (after ``backward()``); return the penalty."""
        if self._state.num_tasks == 0:
            return self._regularizer.zero()
        return self._regularizer.add_grad_()

    # ----------------------------------------------------------------- state
    def _meta(self) -> dict[str, Any]:
        state = self._state
        return {
            "version": __version__, "importance": self.importance, "combine": self.combine, "lam": self.lam,
            "normalization": self.normalization, "num_samples": state.num_samples, "num_batches": state.num_batches,
            "samples_consolidated": state.samples_consolidated, "num_tasks": state.num_tasks,
        }

    def state_dict(self) -> dict[str, Any]:
        """Omega, anchors and the open accumulator by parameter name, plus counts and settings."""
        return {**self._state.state_dict(), **self._meta()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``; every name and shape is checked before anything changes."""
        self._state.check(state, "MAS.load_state_dict")
        for key in ("importance", "combine", "normalization"):
            if key in state and state[key] != getattr(self, key):
                warnings.warn(f"MAS.load_state_dict: state was made with {key}={state[key]!r}, "
                              f"this wrapper uses {getattr(self, key)!r}", stacklevel=2)
        self._state.load_state_dict(state)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors (no pickle), atomically: a temp file renamed into place.

        Under ``torch.distributed`` every rank calls it: an open accumulator
        (samples seen since the last ``consolidate``) is summed over the ranks
        first, as one process would hold it; then rank 0 writes while the
        others wait, and an error on rank 0 is raised on every rank.
        """
        sd = self.state_dict()
        sd["accumulator"], (num_samples, num_batches) = distributed.summed_over_ranks(
            sd["accumulator"], (sd["num_samples"], sd["num_batches"]), self.process_group)
        parts = {part: sd[part] for part in checkpoint.PARTS}
        meta = {**self._meta(), "num_samples": num_samples, "num_batches": num_batches}
        distributed.main_process_only(lambda: checkpoint.write(path, parts, meta), self.process_group, "MAS.save")

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save`; a failed load leaves the state as it was.

        Under ``torch.distributed`` call it on every rank: all get Omega and the
        anchors; an open accumulator in the file (the sum over the ranks that
        saved it) goes to rank 0 only, so the next ``consolidate()`` counts it once.
        """
        parts, meta = checkpoint.read(path, "MAS.load")
        self.load_state_dict({**meta, **parts})
        if not distributed.is_main_process(self.process_group):
            # The file's open accumulator is the sum over the ranks that saved it: rank 0 alone
            # holds it, so the next consolidate() counts those samples once.
            state = self._state
            state.acc.zero_()
            state.num_samples = state.num_batches = 0

    # ----------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this wrapper registered (also done when it is garbage-collected)."""
        remove_handles(self._handles)
        self._tracked.forget()

    def __repr__(self) -> str:
        return (f"MAS(importance={self.importance!r}, combine={self.combine!r}, lam={self.lam}, "
                f"params={len(self._params)}, tasks={self.num_tasks}, num_samples={self.num_samples})")
