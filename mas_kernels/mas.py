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

from . import __version__, checkpoint, distributed
from ._copies import Copyable
from ._model import CheckedOutput, TrackedParams, default_output, modes, remove_handles, unwrap
from .estimators import Plan
from .estimators.batch import call_for
from .options import Options, check_lam
from .regularizer import LayoutChanged, Regularizer
from .session import Session, rules_for
from .state import ImportanceState


class MAS(Copyable):
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
            once (default ``mas_kernels.ops.abs_bmm.DEFAULT_MEMORY_BUDGET``, 256 MiB;
            at least 64 KiB): per-sample gradients, unfolded conv patches.
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

    Memory, copies (``deepcopy``/``pickle``/``torch.save``), files and failures:
    see the README's "The wrapper" section.
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
        self._options = Options(lam, importance, combine, output_fn, uncovered, post_activation, include_frozen,
                                chunk_size, normalization, params, omega_dtype, anchor_dtype, memory_budget, forward)
        self._setup(model, process_group)

    def _setup(self, model: nn.Module, process_group, keep=()) -> None:
        """Everything but the state's values, from ``self._options`` (also for copies and unpickling)."""
        o = self._options
        self.importance, self.combine, self.normalization, self._lam = o.importance, o.combine, o.normalization, o.lam
        self.output_fn = default_output if o.output_fn is None else CheckedOutput(o.output_fn)
        self.forward = o.forward
        self.process_group = process_group
        self.wrapper = model
        self.module = unwrap(model)
        self._tracked = TrackedParams(self.module, o.include_frozen, o.params, keep)
        self._handles: list = []  # the open session's hooks (removed if this wrapper is collected mid-session)
        self._build(self._tracked.params)
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------ parameters
    def _build(self, params: dict[str, nn.Parameter], old: ImportanceState | None = None,
               anchor_dtypes: dict | None = None) -> None:
        """The state, the plan of rules and the penalty's lists for ``params`` (old values kept by name)."""
        distributed.check_unsharded(self.module, params)  # FSDP1 / FSDP2 / tensor parallel: a clear error
        state = ImportanceState(params, old, omega_dtype=self._options.omega_dtype,
                                anchor_dtype=self._options.anchor_dtype, anchor_dtypes=anchor_dtypes)
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
        self._lam = self._regularizer.lam = check_lam(value)

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
    def nbytes(self) -> int:
        """Bytes the wrapper's state holds now: Omega and theta*, and the accumulator and staging
        buffers while a task is open (plus at most 16 bytes of alignment padding per tensor)."""
        return self._state.nbytes()

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

    def _session(self) -> Session:
        """Hooks for one estimation session; ``requires_grad`` restored after.

        Estimation never writes ``.grad`` (it uses ``torch.autograd.grad`` and
        ``torch.func``), so the user's own backward passes inside
        ``accumulating()`` keep their effect.
        """
        state = self._state
        rule, extra = rules_for(self.module, self._params, self._plan, self._options, self.output_fn)
        return Session(self.module, self._params, state, rule, extra, self._handles,
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

    def estimate(self, batches: Iterable, progress: bool = False, *, train_mode: bool = False) -> "MAS":
        """Accumulate importance over ``batches``, an iterable of batches (e.g. a DataLoader).

        Each batch is run as ``forward=`` says (default: a tensor, the first
        item of a tuple/list, labels ignored, or a dict of keyword arguments).
        Runs the model in eval mode unless ``train_mode``. The model's mode and
        every ``.grad`` are restored afterwards.
        """
        with self._session() as session, modes(self.module, train_mode):
            session.run_all(batches, lambda b: call_for(b, self.forward, self._device()), not train_mode,
                            progress, f"MAS {self.importance}")
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
        distributed.raise_rejected(state, self.process_group)
        distributed.consolidate(state, self._params, self.combine, self.normalization == "avalanche",
                                session_open=bool(self._handles), group=self.process_group)
        return self

    # --------------------------------------------------------------- penalty
    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters (one fused op).

        Its backward is differentiable too: ``create_graph=True`` gives the
        Hessian-vector products ``2 lam Omega v`` of a second backward.
        """
        return self._apply_penalty("penalty")

    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (after ``backward()``); return the penalty.

        A frozen parameter (``requires_grad=False``) without a ``.grad`` gets
        none, and its term is left out. No host synchronization.
        """
        return self._apply_penalty("add_grad_")

    def _apply_penalty(self, how: str) -> torch.Tensor:
        """``Regularizer.penalty`` or ``add_grad_`` (0 before the first task); a parameter whose storage
        changed shape or device since is followed first."""
        if self._state.num_tasks == 0:
            return self._regularizer.zero()
        try:
            return getattr(self._regularizer, how)()
        except LayoutChanged:
            self._checked_state()
            return getattr(self._regularizer, how)()

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
        distributed.raise_rejected(state, self.process_group)
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
        distributed.save_over_ranks(path, sd, self._meta(self._state_), self.process_group)

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save`; a failed load leaves the state as it was.

        Under ``torch.distributed`` call it on every rank: all get Omega and the
        anchors; an open accumulator in the file (the sum over the ranks that
        saved it) goes to rank 0 only, so the next ``consolidate()`` counts it once.
        """
        path = checkpoint.check_path(path, "MAS.load")
        parts, meta = checkpoint.read(path, "MAS.load")
        self.load_state_dict({**meta, **parts})
        distributed.keep_open_task_on_rank0(self._state, self.process_group)

    # ----------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this wrapper registered (also done when it is garbage-collected)."""
        remove_handles(self._handles)
        self._tracked.forget()

    def __repr__(self) -> str:
        state = self._state_
        return (f"MAS(importance={self.importance!r}, combine={self.combine!r}, lam={self.lam}, "
                f"params={len(self._params)}, tasks={state.num_tasks}, num_samples={state.num_samples})")
