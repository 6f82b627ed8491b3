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
from torch.nn.parameter import is_lazy

from . import __version__, checkpoint, distributed, fsdp, zero
from ._copies import Copyable
from ._model import CheckedOutput, TrackedParams, default_output, modes, remove_handles, unwrap
from .estimators import Plan
from .estimators.batch import call_for
from .options import Options, check_lam
from .regularizer import LayoutChanged, Regularizer
from .estimators.batch import Layouts
from .session import Session, estimators_for, own_passes
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
        sample_dim: where the model's input keeps its samples, for every rule's N and the
            per-sample rules. Default None: *observed*, once per call signature: the model runs on
            a sub-batch of 1-3 samples taken along dim 0 of its first tensor argument (then along its
            other dims), and the dim along which the sub-batch's outputs are the batch's own holds the
            samples (a ``(T, N)`` input of a sequence-first model: dim 1); other arguments are sliced
            along a dim of size N where that keeps the outputs the same, else shared (a ``(T, T)``
            mask). Say it instead with an int (the first tensor argument's dim) or a dict
            ``{argument name or position: dim, or None for an argument the whole batch shares}`` (N
            counted in the first argument not called shared: ``{0: None, 1: 0}`` for an
            ``nn.EmbeddingBag``'s flat ids with offsets).
        verify: the self-check of the exact rule (``"global"``, and the uncovered parameters of
            ``"local"``): ``True`` (default) compares, on the first batch of each call signature in
            every ``estimate()``/``accumulating()``, the fast per-layer rules on 1-3 of the batch's
            samples with the definition taken literally (one backward per sample, each run alone), and
            raises ``VerificationError`` naming the parameters and layers that disagree, before
            anything is committed; ``"always"`` checks every batch (tests); ``False`` turns it off.
        per_sample_fallback: parameters whose exact importance comes from one backward pass per sample
            through the recorded graph (exact for any use of them, slow): a list of names, a callable
            ``name -> bool``, or True for all. Parameters no rule can serve as observed (used outside
            the layers that own them, layers whose samples could not be located) get it anyway, with a
            warning naming them.
        process_group: for ``torch.distributed``: ``consolidate()`` and
            ``save()`` sum importance numerators and sample counts over it.
            Default: the group of a DDP wrapper, or an FSDP2 model's mesh;
            for a model in neither, no collective at all (each rank alone: a
            wrapper used on rank 0 only never waits for the others); pass
            ``dist.group.WORLD`` to sum over every rank, ``False`` to never
            communicate.
        batch_ranks: ``importance="global_batch"`` on FSDP2 shards: ``"per_rank"``
            (default, DDP's semantics: ``sum_r |g_{b,r}|``, each rank's batch a
            batch) or ``"concatenated"`` (``|sum_r g_{b,r}|``: the ranks' batches
            together are one batch).
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
    see docs/api.md.
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
        sample_dim: int | dict | None = None,
        verify: bool | str = True,
        per_sample_fallback: Callable | Iterable[str] | bool | None = None,
        batch_ranks: str = "per_rank",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAS: model must be an nn.Module, got {type(model).__name__}")
        self._options = Options(lam, importance, combine, output_fn, uncovered, post_activation, include_frozen,
                                chunk_size, normalization, params, omega_dtype, anchor_dtype, memory_budget, forward,
                                sample_dim, verify, per_sample_fallback, batch_ranks)
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
        self._sharded = fsdp.is_sharded(self.module)  # FSDP2: the state is kept per local shard (fsdp.py)
        if self._sharded:
            fsdp.reshard(self.module)  # never hold the unsharded tensors a no_grad forward leaves on the root
        self._group = distributed.group_for(model, process_group)  # False: no collectives
        self._zero = zero.stage(model)  # a DeepSpeed ZeRO engine ignores .grad
        distributed.warn_unwrapped(self._group, process_group, self._sharded)
        self._tracked = TrackedParams(self.module, o.include_frozen, o.params, keep)
        self._handles: list = []  # the open session's hooks (removed if this wrapper is collected mid-session)
        self._build(self._tracked.params)
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # ------------------------------------------------------------ parameters
    def _build(self, params: dict[str, nn.Parameter], old: ImportanceState | None = None,
               anchor_dtypes: dict | None = None) -> None:
        """The state, the plan of rules and the penalty's lists for ``params`` (old values kept by name)."""
        if not self._sharded and fsdp.is_sharded(self.module):  # fully_shard-ed since: the state follows, sliced
            self._sharded = True
            fsdp.reshard(self.module)
            self._group = distributed.group_for(self.wrapper, self.process_group)
        distributed.check_unsharded(self.module, params, dtensors=not self._sharded)  # FSDP1, TP: a clear error
        lazy = [n for n, p in params.items() if is_lazy(p)]
        if lazy:
            raise ValueError(f"MAS: parameters {lazy[:4]}{' ...' if len(lazy) > 4 else ''} are not initialized yet "
                             "(lazy modules, e.g. nn.LazyLinear, take their shapes from their first forward); run "
                             "the model once on a batch, then wrap it")
        meta = [n for n, p in params.items() if p.is_meta]
        if meta:
            raise ValueError(f"MAS: parameters {meta[:4]}{' ...' if len(meta) > 4 else ''} are on the meta device "
                             "(no data); materialize the model first (model.to_empty(device=...) and load its "
                             "weights), then wrap it")
        if zero.is_zero3(params) is not None:
            raise NotImplementedError(
                f"MAS: parameter {zero.is_zero3(params)!r} is partitioned by DeepSpeed ZeRO-3 (each rank holds a "
                "flat slice, the module an empty tensor); estimate on an unsharded replica (or FSDP2), save() it, "
                "and apply the penalty with mas_kernels.ZeroPenalty(engine, path)")
        kinds = dict(omega_dtype=self._options.omega_dtype, anchor_dtype=self._options.anchor_dtype,
                     anchor_dtypes=anchor_dtypes)
        if self._sharded:
            state, self._group = fsdp.sharded_state(self.module, params, old, self.process_group, **kinds)
        else:
            state = ImportanceState(params, old, **kinds)
            if distributed.active(self._group):  # a non-finite batch: a warning at consolidate(), ranks in step
                state.defer_finite_check = True
        self._regularizer = Regularizer("MAS", list(params.values()), [state.anchors[n] for n in params],
                                        [state.omega[n] for n in params], self._lam, names=list(params),
                                        local=fsdp.local_view if self._sharded else None,
                                        local_data=fsdp.local_data if self._sharded else None)
        self._params, self._state_, self._plan = params, state, Plan(self.module, params)
        o = self._options
        # The layouts observed per call signature (where samples are, which ops use which parameter), kept
        # across estimate()/accumulating() calls until the tracked parameters change.
        self._layouts = Layouts(self.module, self._plan, fsdp.GraphParams(params, self.module) if self._sharded
                                else params, o.output_fn if o.importance == "local" else
                                self.output_fn, o.sample_dim, own_passes,
                                exact=o.importance == "global" or (o.importance == "local" and o.uncovered == "global"),
                                track=o.importance == "local",
                                agree=fsdp.agreement(self._group) if self._sharded else None)

    @property
    def _state(self) -> ImportanceState:
        """The state, rebuilt first if parameters were added, removed or replaced since (cheap: the training step).

        On FSDP2 shards the modules hold unsharded parameters between a forward and the next reshard (the
        root after a no_grad forward): there only registrations and module changes are followed here, and
        replaced entries by the entry points that reshard first (:meth:`_checked_state`)."""
        params = self._tracked.changed(full=not self._sharded)
        if params is not None:
            self._build(params, self._state_)
        return self._state_

    def _checked_state(self) -> ImportanceState:
        """The state after a full check of the parameters (the non-step entry points): also a
        parameter removed from its module, or whose storage changed shape or device (the state
        follows: a parameter that grew keeps its leading entries, one moved to another device takes
        its state along)."""
        if self._sharded:
            fsdp.reshard(self.module)
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
        self._state  # noqa: B018 - the property rebuilds the state first if parameters changed
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
        self._state  # noqa: B018 - the property rebuilds the state first if parameters changed
        return self._plan.covered

    @property
    def uncovered(self) -> list[str]:
        """Parameters no layer rule covers (for ``"local"``, handled as ``uncovered=`` says)."""
        self._state  # noqa: B018 - the property rebuilds the state first if parameters changed
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
        o = self._options
        if self._sharded and self.importance == "global_batch":
            estimator, extra = fsdp.ShardedBatchEstimator(self.module, self._params, self._plan, self.output_fn,
                                                     state.sharding, o.batch_ranks), None
        else:
            estimator, extra = estimators_for(self.module, self._params, self._plan, o, self.output_fn)
            if self._sharded:  # identity checks on the autograd graph must see FSDP2's unsharded tensors
                for exact in (estimator, extra[0] if extra else None):
                    if exact is not None and hasattr(exact, "params"):
                        exact.params = fsdp.GraphParams(exact.params, self.module)
        # The self-check's one backward per sample would be collectives of their own on FSDP2 shards, and
        # gradients w.r.t. sharded parameters: verify the rules on an unsharded replica instead.
        return Session(self.module, self._params, state, estimator, extra, self._handles, self._layouts,
                       per_batch_mean=self.normalization == "avalanche", verify=o.verify and not self._sharded,
                       output_fn=self.output_fn, uncovered=o.uncovered)

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
        if self._sharded and not isinstance(batches, torch.Tensor):  # FSDP2's forward is a collective
            batches = fsdp.in_step(batches, self._state.sharding)
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

    def consolidate(self, *, timeout: float | None = None) -> "MAS":
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

        ``timeout``: seconds to wait for the other ranks to reach it; past
        that, a ``TimeoutError`` naming ``MAS.consolidate`` on every rank that
        waited (default: the process group's own timeout). Ranks whose options
        or tracked parameters differ raise a ``RuntimeError`` on every rank.
        """
        state = self._checked_state()
        distributed.raise_rejected(state, self._group)
        params = {n: fsdp.local_view(p.detach()) for n, p in self._params.items()} if self._sharded else self._params
        n, n_batches = distributed.all_reduce_importance(
            state.acc, (state.num_samples, state.num_batches), self._group,
            names=state.sharding.replicated if self._sharded else None, fingerprint=self._fingerprint(state),
            timeout=timeout)
        state.consolidate(n, n_batches, self.combine, self.normalization == "avalanche", params,
                          session_open=bool(self._handles))
        return self

    def _fingerprint(self, state: ImportanceState) -> str:
        """The options and consolidated history every rank must share (checked at consolidate() and save())."""
        o = self._options
        text = (f"importance={o.importance!r}, combine={o.combine!r}, normalization={o.normalization!r}, "
                f"uncovered={o.uncovered!r}, include_frozen={o.include_frozen}, omega_dtype={o.omega_dtype}, "
                f"anchor_dtype={o.anchor_dtype}, batch_ranks={o.batch_ranks!r}, lam={self.lam!r}, "
                f"num_tasks={state.num_tasks}, samples_consolidated={state.samples_consolidated}")
        return text + (f", sharded={state.sharding.layout_text()}" if self._sharded else "")

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
        none, and its term is left out. No host synchronization. On a
        DeepSpeed ZeRO-1/2 engine (which ignores ``.grad``) a ``NotImplementedError``
        pointing to :class:`mas_kernels.ZeroPenalty`, never a silent no-op.
        """
        if self._zero:
            zero.refuse_add_grad(self._zero)
        return self._apply_penalty("add_grad_")

    def _step_regularizer(self) -> Regularizer | None:
        """The penalty's fixed lists for a fused optimizer step (``mk.optim``), layout checked; ``None``
        before the first task (no penalty yet). A parameter whose storage changed shape or device is
        followed first, as in :meth:`add_penalty_grad_`."""
        if self._state.num_tasks == 0:
            return None
        try:
            self._regularizer.check_layout()
        except LayoutChanged:
            self._checked_state()
        return self._regularizer

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
        distributed.raise_rejected(state, self._group)
        if self._sharded:
            return {**fsdp.state_dict(state, self._params), **self._meta(state)}
        return {**state.state_dict(), **self._meta(state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``: every field is checked (names, shapes, dtypes, finite and
        non-negative importance, integer counts) before anything changes, and a bad one is named."""
        target = self._checked_state()
        if self._sharded:
            state = fsdp.local_state(state, target, "MAS.load_state_dict")
        target.check(state, "MAS.load_state_dict")
        if self.normalization == "avalanche" and "num_batches" not in state and int(state.get("num_samples", 0)):
            raise ValueError(
                f"MAS.load_state_dict: the state has an open task ({int(state['num_samples'])} samples since its "
                "last consolidate) but no num_batches (it was written before mas_kernels kept it), and "
                "normalization='avalanche' divides by the number of batches; consolidate it where it was made, "
                "or load it into a wrapper with normalization='samples'")
        for key in ("importance", "combine", "normalization"):
            if key in state and state[key] != getattr(self, key):
                warnings.warn(f"MAS.load_state_dict: state was made with {key}={state[key]!r}, "
                              f"this wrapper uses {getattr(self, key)!r}", stacklevel=2)
        target.load_state_dict(state)

    def save(self, path: str | os.PathLike, *, timeout: float | None = None) -> None:
        """Write the state as safetensors (no pickle), atomically (see :func:`checkpoint.write`: the
        mode of a file it replaces is kept, a symlink is written through, data and folder are
        fsynced, a CRC32 of each part is stored and checked by :meth:`load`).

        Under ``torch.distributed`` every rank calls it: an open accumulator
        (samples seen since the last ``consolidate``) is summed over the ranks
        first, as one process would hold it; then rank 0 writes while the
        others wait, and an error on rank 0 is raised on every rank (``timeout``:
        as for :meth:`consolidate`). On FSDP2 shards the file is the same
        one-file format, written by rank 0 one parameter at a time (no rank
        holds the whole state); it loads on any number of ranks.
        """
        path = checkpoint.check_path(path, "MAS.save")
        state = self._checked_state()
        distributed.raise_rejected(state, self._group)
        if self._sharded:
            fsdp.save(path, state, self._meta(state), self._fingerprint(state), timeout)
            return
        sd = {**state.state_dict(), **self._meta(state)}
        distributed.save_over_ranks(path, sd, self._meta(state), self._group, fingerprint=self._fingerprint(state),
                                    timeout=timeout)

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save`; a failed load leaves the state as it was.

        Under ``torch.distributed`` call it on every rank: all get Omega and the
        anchors; an open accumulator in the file (the sum over the ranks that
        saved it) goes to rank 0 only, so the next ``consolidate()`` counts it once.
        """
        path = checkpoint.check_path(path, "MAS.load")
        if self._sharded:  # each rank reads its own rows only; a failure on one rank is raised on all
            state = self._checked_state()
            parts, meta = fsdp.read_rows(path, state, "MAS.load")
            try:
                self.load_state_dict({**meta, **parts})
                error = None
            except BaseException as exc:
                error = exc
            fsdp.agree(error, state.sharding, "MAS.load")
            fsdp.keep_open_task(self._state)
            return
        parts, meta = checkpoint.read(path, "MAS.load")
        self.load_state_dict({**meta, **parts})
        distributed.keep_open_task_on_rank0(self._state, self._group)

    # ----------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this wrapper registered (also done when it is garbage-collected). The wrapper
        still serves the penalty and follows parameters replaced in the model afterwards."""
        remove_handles(self._handles)

    def __repr__(self) -> str:
        state = self._state_
        return (f"MAS(importance={self.importance!r}, combine={self.combine!r}, lam={self.lam}, "
                f"params={len(self._params)}, tasks={state.num_tasks}, num_samples={state.num_samples})")
