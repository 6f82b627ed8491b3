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
import copy
import math
import numbers
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
from .regularizer import LayoutChanged, Regularizer
from .session import Session
from .state import STATE_DTYPES, ImportanceState, check_combine

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
        params: which parameters to track: a callable ``(name, param) -> bool``
            (e.g. ``lambda n, p: not n.startswith("head.")`` for the backbone
            only, as FACIL does) or a list of names (an unknown name raises
            ``ValueError`` naming it); default: all (that require grad, unless
            ``include_frozen``). Untracked parameters get no importance and no penalty.
        omega_dtype: storage of Omega: ``torch.float32`` (default) or
            ``torch.bfloat16`` for large models (half the bytes, float32's
            range). The penalty reads Omega into float32; Omega is rounded
            once per ``consolidate()``, to a relative error of at most 2**-9
            per entry, so the penalty's value (a sum of terms >= 0) and each
            gradient entry are within 2**-9 relative of the float32 state's
            (measured on the demo MLP: value 6e-6, gradient 1.7e-3 in L2).
        anchor_dtype: storage of theta*: ``None`` (default) keeps each
            parameter's own dtype (exact), ``torch.float32``, or
            ``torch.bfloat16`` to halve it for a float32 model, at the price of
            rounding theta* (relative error 2**-9 per entry): the penalty then
            pulls toward the rounded anchor (at theta = theta* it is ``lam sum
            Omega (theta* - round(theta*))^2`` instead of 0), which matters
            while theta is within ~2**-9 |theta*| of theta* (measured on the
            demo MLP: gradient error 3.5% in L2 at a drift of 1e-3, 0.3% at 1e-2).

    Memory: Omega and theta* for life; the task's accumulator and a one-batch
    staging buffer (float32 each) only while a task is open, from its first
    batch to ``consolidate()``. Copies: ``copy.deepcopy(mas)`` (with the model:
    ``copy.deepcopy((model, mas))`` keeps the pair together), ``pickle`` and
    ``torch.save(mas)`` give an independent, correct wrapper on the copied
    model; they refuse while ``estimate()``/``accumulating()`` is open, and
    pickling refuses a wrapper with a ``process_group``.
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
        params: Callable | Iterable[str] | None = None,
        omega_dtype: torch.dtype = torch.float32,
        anchor_dtype: torch.dtype | None = None,
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
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                       or chunk_size <= 0):
            raise ValueError(f"MAS: chunk_size={chunk_size!r} must be a positive number of samples per chunk, "
                             "or None to pick one that keeps per-sample gradients under ~256 MiB")
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"MAS: output_fn must be a callable that picks the output tensor, "
                             f"got {type(output_fn).__name__}")
        if omega_dtype not in STATE_DTYPES:
            raise ValueError(f"MAS: omega_dtype={omega_dtype!r} must be torch.float32 or torch.bfloat16 (float16's "
                             "range, up to 65504, would turn large importances into inf)")
        if anchor_dtype is not None and anchor_dtype not in STATE_DTYPES:
            raise ValueError(f"MAS: anchor_dtype={anchor_dtype!r} must be None (each parameter's dtype), "
                             "torch.float32 or torch.bfloat16")
        if memory_budget is not None and (isinstance(memory_budget, bool)
                                          or not isinstance(memory_budget, numbers.Integral) or memory_budget <= 0):
            raise ValueError(f"MAS: memory_budget={memory_budget!r} must be a positive number of bytes, or None "
                             "for the default (256 MiB)")
        if forward is not None and not callable(forward):
            raise ValueError(f"MAS: forward must be a callable forward(model, batch) -> output, "
                             f"got {type(forward).__name__}")
        self._config = dict(lam=check_lam(lam), importance=importance, combine=check_combine(combine),
                            output_fn=output_fn, uncovered=uncovered, post_activation=post_activation,
                            include_frozen=bool(include_frozen), chunk_size=chunk_size, normalization=normalization,
                            params=params, omega_dtype=omega_dtype, anchor_dtype=anchor_dtype,
                            memory_budget=memory_budget, forward=forward)
        self._setup(model, process_group)

    def _setup(self, model: nn.Module, process_group, keep=()) -> None:
        """Everything but the state's values, from ``self._config`` (also for copies and unpickling)."""
        c = self._config
        self.normalization = c["normalization"]
        self.combine = c["combine"]
        self._lam = c["lam"]
        self.importance = c["importance"]
        self.output_fn = default_output if c["output_fn"] is None else CheckedOutput(c["output_fn"])
        self.uncovered_policy = c["uncovered"]
        self.post_activation = c["post_activation"]
        self.chunk_size = c["chunk_size"]
        self.memory_budget = c["memory_budget"]
        self.forward = c["forward"]
        self.process_group = process_group
        self.omega_dtype, self.anchor_dtype = c["omega_dtype"], c["anchor_dtype"]
        self.wrapper = model
        self.module = unwrap(model)
        self._tracked = TrackedParams(self.module, c["include_frozen"], c["params"], keep)
        self._handles: list = []  # the open session's hooks (removed if this wrapper is collected mid-session)
        self._build(self._tracked.params)
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------ parameters
    def _build(self, params: dict[str, nn.Parameter], old: ImportanceState | None = None,
               anchor_dtypes: dict | None = None) -> None:
        """The state, the plan of rules and the penalty's lists for ``params`` (old values kept by name)."""
        distributed.check_unsharded(self.module, params)  # FSDP1 / FSDP2 / tensor parallel: a clear error
        state = ImportanceState(params, old, omega_dtype=self.omega_dtype, anchor_dtype=self.anchor_dtype,
                                anchor_dtypes=anchor_dtypes)
        self._regularizer = Regularizer("MAS", list(params.values()), [state.anchors[n] for n in params],
                                        [state.omega[n] for n in params], self._lam, names=list(params))
        self._params, self._state_, self._plan = params, state, Plan(self.module, params)

    @property
    def _state(self) -> ImportanceState:
        """The state, rebuilt first if parameters were added, removed or replaced since (cheap: the training step)."""
        params = self._tracked.changed()
        if params is not None:
            self._build(params, self._state_)
        return self._state_

    def _checked_state(self) -> ImportanceState:
        """The state after a full check of the parameters (the non-step entry points): also a
        parameter removed from its module, or whose storage changed shape or device (the state
        follows: a parameter that grew keeps its leading entries, one moved to another device takes
        its state along)."""
        params = self._tracked.changed(full=True)
        if params is not None:
            self._build(params, self._state_)
        else:
            try:
                self._regularizer.check_layout()
            except LayoutChanged:
                self._build(self._params, self._state_)
        return self._state_

    @property
    def lam(self) -> float:
        """lambda, the penalty strength (may be changed between steps)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = self._regularizer.lam = self._config["lam"] = check_lam(value)

    @property
    def include_frozen(self) -> bool:
        return self._tracked.include_frozen

    @property
    def tracked(self) -> list[str]:
        """The names of the tracked parameters (importance, theta* and the penalty cover these)."""
        self._state
        return list(self._params)

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
        """Samples seen since the last ``consolidate()`` (reading it settles the deferred finite check:
        on CUDA, one host synchronization)."""
        state = self._state
        state.settle()
        return state.num_samples

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
    def check_finite(self) -> None:
        """Raise the ``FloatingPointError`` of a batch that was left out of the importance, if any.

        On CPU a non-finite batch (or one that would overflow the float32 sum)
        raises at once, in ``estimate()`` or the forward inside
        ``accumulating()``. On CUDA batches are checked on the device without
        a host synchronization: such a batch is discarded there and its error
        raised here, or by the next ``consolidate()``, ``save()`` or
        ``state_dict()``, once (the other batches are kept).
        """
        self._state.check_finite()

    def _report_rejected(self, state: ImportanceState) -> None:
        """Raise the deferred error of a rejected batch; under torch.distributed warn instead (the
        collectives that follow need every rank, so one rank raising would leave the others waiting)."""
        if not distributed.active(self.process_group):
            state.check_finite()
            return
        try:
            state.check_finite()
        except FloatingPointError as exc:
            rank = torch.distributed.get_rank(self.process_group)
            warnings.warn(f"{exc} [rank {rank}: going on without it, so that every rank stays in step]",
                          RuntimeWarning, stacklevel=3)

    def consolidate(self) -> "MAS":
        """Fold this task's importance into Omega and snapshot theta* (the anchors).

        ``new = accumulator / N``; then ``sum``: ``Omega += new``; ``mean``:
        ``Omega = (N_old Omega + N new) / (N_old + N)``; alpha:
        ``Omega = alpha Omega + (1 - alpha) new`` (``Omega = new`` for the first
        task). Under ``torch.distributed`` the numerators and N are all-reduced
        first, so every rank gets the Omega of the union of the data. Raises
        the deferred ``FloatingPointError`` of a rejected batch first (see
        :meth:`check_finite`), changing nothing (under ``torch.distributed`` a
        ``RuntimeWarning`` instead, and the other batches are folded, since
        every rank must reach the all-reduce). The accumulator is released.
        """
        state = self._checked_state()
        self._report_rejected(state)
        n, n_batches = distributed.all_reduce_importance(state.acc, (state.num_samples, state.num_batches),
                                                         self.process_group)
        if n == 0:
            if not state.num_samples:
                state.release(staging=not self._handles)
            raise RuntimeError(
                "MAS.consolidate(): no samples seen since the last consolidate; call estimate() "
                "or run forward passes inside accumulating() first"
            )
        state.fold(n, self.combine, divisor=n_batches if self.normalization == "avalanche" else n)
        state.snapshot(self._params)
        if not self._handles:  # an open session's hooks still write into the staging buffers
            state.release()
        return self

    # --------------------------------------------------------------- penalty
    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters (one fused op).

        Its backward is differentiable too: ``create_graph=True`` gives the
        Hessian-vector products ``2 lam Omega v`` of a second backward.
        """
        if self._state.num_tasks == 0:
            return self._regularizer.zero()
        try:
            return self._regularizer.penalty()
        except LayoutChanged:  # a parameter's storage changed shape or device: the state follows it
            self._checked_state()
            return self._regularizer.penalty()

    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (after ``backward()``); return the penalty.

        A frozen parameter (``requires_grad=False``) without a ``.grad`` gets
        none, and its term is left out. No host synchronization.
        """
        if self._state.num_tasks == 0:
            return self._regularizer.zero()
        try:
            return self._regularizer.add_grad_()
        except LayoutChanged:  # a parameter's storage changed shape or device: the state follows it
            self._checked_state()
            return self._regularizer.add_grad_()

    # ----------------------------------------------------------------- state
    def _meta(self, state: ImportanceState) -> dict[str, Any]:
        return {
            "version": __version__, "importance": self.importance, "combine": self.combine, "lam": self.lam,
            "normalization": self.normalization, "num_samples": state.num_samples, "num_batches": state.num_batches,
            "samples_consolidated": state.samples_consolidated, "num_tasks": state.num_tasks,
        }

    def state_dict(self) -> dict[str, Any]:
        """Omega, anchors and the open accumulator by parameter name, plus counts and settings.

        Raises the deferred ``FloatingPointError`` of a rejected batch first (see :meth:`check_finite`).
        """
        state = self._checked_state()
        self._report_rejected(state)
        return {**state.state_dict(), **self._meta(state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``: every field is checked (names, shapes, dtypes, finite and
        non-negative importance, integer counts) before anything changes, and a bad one is named."""
        target = self._checked_state()
        target.check(state, "MAS.load_state_dict")
        for key in ("importance", "combine", "normalization"):
            if key in state and state[key] != getattr(self, key):
                warnings.warn(f"MAS.load_state_dict: state was made with {key}={state[key]!r}, "
                              f"this wrapper uses {getattr(self, key)!r}", stacklevel=2)
        target.load_state_dict(state)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors (no pickle), atomically (see :func:`checkpoint.write`: the
        mode of a file it replaces is kept, a symlink is written through, data and folder are
        fsynced, a CRC32 of each part is stored and checked by :meth:`load`).

        Under ``torch.distributed`` every rank calls it: an open accumulator
        (samples seen since the last ``consolidate``) is summed over the ranks
        first, as one process would hold it; then rank 0 writes while the
        others wait, and an error on rank 0 is raised on every rank.
        """
        path = checkpoint.check_path(path, "MAS.save")
        sd = self.state_dict()
        sd["accumulator"], (num_samples, num_batches) = distributed.summed_over_ranks(
            sd["accumulator"], (sd["num_samples"], sd["num_batches"]), self.process_group)
        parts = {part: sd[part] for part in checkpoint.PARTS}
        meta = {**self._meta(self._state_), "num_samples": num_samples, "num_batches": num_batches}
        distributed.main_process_only(lambda: checkpoint.write(path, parts, meta, "MAS.save"), self.process_group,
                                      "MAS.save")

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save`; a failed load leaves the state as it was.

        Under ``torch.distributed`` call it on every rank: all get Omega and the
        anchors; an open accumulator in the file (the sum over the ranks that
        saved it) goes to rank 0 only, so the next ``consolidate()`` counts it once.
        """
        path = checkpoint.check_path(path, "MAS.load")
        parts, meta = checkpoint.read(path, "MAS.load")
        self.load_state_dict({**meta, **parts})
        if not distributed.is_main_process(self.process_group):
            # The file's open accumulator is the sum over the ranks that saved it: rank 0 alone
            # holds it, so the next consolidate() counts those samples once.
            state = self._state
            state.release(staging=False)
            state.num_samples = state.num_batches = 0

    # ----------------------------------------------------------------- copies
    def _snapshot(self) -> dict[str, Any]:
        if self._handles:
            raise RuntimeError("MAS: cannot copy or pickle a wrapper while estimate()/accumulating() is open; "
                               "copy it after the block")
        state = self._checked_state()
        state.settle()
        values = state.state_dict()
        values["pending"] = state._pending
        return {"config": dict(self._config, lam=self._lam), "model": self.wrapper, "state": values,
                "tracked": list(self._params)}

    def _restore(self, snap: dict[str, Any], process_group) -> None:
        self._config = snap["config"]
        self._setup(snap["model"], process_group, snap.get("tracked", ()))
        values = dict(snap["state"])
        pending = values.pop("pending", None)
        dtypes = {n: t.dtype for n, t in values["anchors"].items()}
        if any(self._state_.anchors[n].dtype != d for n, d in dtypes.items() if n in self._state_.anchors):
            self._build(self._params, anchor_dtypes=dtypes)  # theta* in the dtypes the original holds
        self._state_.load_state_dict(values, "MAS (copy)")
        self._state_._pending = pending

    def __getstate__(self) -> dict[str, Any]:
        """For pickle and ``torch.save``: the settings, the model and the state's values (not the hooks)."""
        if self.process_group is not None:
            raise TypeError("MAS: a wrapper with a process_group cannot be pickled (a process group belongs to "
                            "its process); pickle the model and mas.state_dict(), or use mas.save()")
        return self._snapshot()

    def __setstate__(self, snap: dict[str, Any]) -> None:
        self._restore(snap, None)

    def __deepcopy__(self, memo: dict) -> "MAS":
        """An independent wrapper on a deep copy of the model (the one in ``memo`` when the model is
        copied in the same call), with a copy of the state; a process group is shared."""
        snap = self._snapshot()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new._restore(copy.deepcopy(snap, memo), self.process_group)
        return new

    def __copy__(self) -> "MAS":
        """An independent wrapper on the same model, with a copy of the state."""
        new = type(self).__new__(type(self))
        new._restore(self._snapshot(), self.process_group)
        return new

    # ----------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this wrapper registered (also done when it is garbage-collected)."""
        remove_handles(self._handles)
        self._tracked.forget()

    def __repr__(self) -> str:
        state = self._state_
        return (f"MAS(importance={self.importance!r}, combine={self.combine!r}, lam={self.lam}, "
                f"params={len(self._params)}, tasks={state.num_tasks}, num_samples={state.num_samples})")


def check_lam(lam, who: str = "MAS") -> float:
    """``lam`` as a float: a finite number >= 0 whose gradient scale ``2 lam`` fits float32."""
    if isinstance(lam, bool) or not isinstance(lam, (numbers.Real, torch.Tensor)) or (
            isinstance(lam, torch.Tensor) and lam.numel() != 1):
        raise ValueError(f"{who}: lam must be a number (the penalty strength, >= 0), got {type(lam).__name__} {lam!r}")
    value = float(lam)
    if not math.isfinite(value) or value < 0 or 2 * value > float(torch.finfo(torch.float32).max):
        raise ValueError(f"{who}: lam={value!r} must be a finite number >= 0 (the penalty strength; 0 turns the "
                         "penalty off)")
    return value


class CheckedOutput:
    """A user's ``output_fn``, whose result must be one tensor (a class, so a wrapper using it can be pickled)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, out: Any) -> torch.Tensor:
        y = self.fn(out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"MAS: output_fn returned a {type(y).__name__}; it must return one tensor, whose "
                            "squared L2 norm defines importance (e.g. output_fn=lambda out: out[0], or "
                            "torch.cat(...) of several)")
        return y
