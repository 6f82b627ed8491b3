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
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import __version__, importance as rules
from .ops.penalty import _check as _check_penalty_args
from .state import FlatBuffers

IMPORTANCE = ("local", "global", "global_batch")
UNCOVERED = ("global", "skip", "error")
_FORMAT = "mas_kernels.MAS/1"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _default_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(
        f"MAS: the model returned a {type(out).__name__}; pass output_fn= to pick the output tensor "
        "whose squared L2 norm defines importance (e.g. output_fn=lambda out: out['logits'])"
    )


# Any module, anywhere, registering a parameter or a submodule marks every live
# MAS as possibly stale, so the training step needs no per-parameter check.
_LIVE: "weakref.WeakSet[MAS]" = weakref.WeakSet()
_GLOBAL_HOOKS: list = []


def _mark_stale(*_args) -> None:
    for mas in list(_LIVE):
        mas._stale = True


def _install_global_hooks() -> None:
    if not _GLOBAL_HOOKS:
        from torch.nn.modules import module as _m

        _GLOBAL_HOOKS.append(_m.register_module_parameter_registration_hook(_mark_stale))
        _GLOBAL_HOOKS.append(_m.register_module_module_registration_hook(_mark_stale))


def _set_modes(modes: dict) -> None:
    for m, training in modes.items():
        m.training = training


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


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
        chunk_size: samples per chunk for per-sample gradients (memory bound);
            ``None`` picks one that keeps them under ~256 MiB.
        process_group: for ``torch.distributed``: ``consolidate()`` all-reduces
            importance numerators and sample counts over it (default group when
            initialized).
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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAS: model must be an nn.Module, got {type(model).__name__}")
        if importance not in IMPORTANCE:
            raise ValueError(f"MAS: importance={importance!r} is not one of {IMPORTANCE}")
        if uncovered not in UNCOVERED:
            raise ValueError(f"MAS: uncovered={uncovered!r} is not one of {UNCOVERED}")
        self.combine = self._check_combine(combine)
        self.lam = float(lam)
        self.importance = importance
        self.output_fn = output_fn or _default_output
        self.uncovered_policy = uncovered
        self.post_activation = post_activation
        self.include_frozen = include_frozen
        self.chunk_size = chunk_size
        self.process_group = process_group
        self.wrapper = model
        self.module = unwrap(model)

        self.num_samples = 0          # since the last consolidate
        self.samples_consolidated = 0  # in all consolidated tasks
        self.num_tasks = 0
        self._busy = False
        self._session_handles: list = []
        self._stale = False
        self._build(self._tracked())
        _install_global_hooks()
        _LIVE.add(self)
        self._finalizer = weakref.finalize(self, _remove_handles, self._session_handles)

    # ------------------------------------------------------------ parameters
    @staticmethod
    def _check_combine(combine):
        if isinstance(combine, str):
            if combine not in ("sum", "mean"):
                raise ValueError(f"MAS: combine={combine!r} must be 'sum', 'mean' or a float alpha in [0, 1]")
            return combine
        alpha = float(combine)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"MAS: combine alpha={alpha} must lie in [0, 1]")
        return alpha

    def _tracked(self) -> dict[str, nn.Parameter]:
        return {
            name: p for name, p in self.module.named_parameters()
            if p.requires_grad or self.include_frozen
        }

    def _build(self, params: dict[str, nn.Parameter], old: dict | None = None) -> None:
        """(Re)create the flat stores for ``params``, keeping old values by name."""
        from .distributed import check_unsharded

        check_unsharded(self.module, params)  # FSDP1 / FSDP2 / tensor parallel: a clear error, not a DTensor one
        specs = [(n, p.shape, p.device, p.dtype) for n, p in params.items()]
        omega = FlatBuffers(specs, dtype=torch.float32)
        anchors = FlatBuffers(specs)
        acc = FlatBuffers(specs, dtype=torch.float32)
        staging = FlatBuffers(specs, dtype=torch.float32)
        with torch.no_grad():
            for name, p in params.items():
                anchors[name].copy_(p)
                if old is not None and name in old["omega"] and old["omega"][name].shape == p.shape:
                    omega[name].copy_(old["omega"][name])
                    anchors[name].copy_(old["anchors"][name])
                    acc[name].copy_(old["acc"][name])
                elif old is not None and name in old["omega"]:
                    warnings.warn(f"MAS: parameter {name!r} changed shape; its importance starts from zero",
                                  stacklevel=3)
        self._params = params
        self._omega, self._anchors, self._acc, self._staging = omega, anchors, acc, staging
        # Fixed lists for the fused penalty, validated once here, not per step.
        self._pen_params = list(params.values())
        self._pen_detached = [p.detach() for p in self._pen_params]
        self._pen_anchors = [anchors[n] for n in params]
        self._pen_omegas = [omega[n] for n in params]
        if self._pen_params:
            _check_penalty_args("MAS", self._pen_params, self._pen_anchors, self._pen_omegas, self.lam)
        self._classify()
        self._stale = False

    def _classify(self) -> None:
        """Which parameters the layer rules cover, and which need per-sample torch.func."""
        owners: dict[int, list[str]] = {}
        for mname, m in self.module.named_modules(remove_duplicate=False):
            for pname, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(mname)
        by_id = {id(p): n for n, p in self._params.items()}
        self._layers: list[tuple[str, nn.Module, str | None, str | None]] = []
        covered: set[str] = set()
        seen_modules: set[int] = set()
        for mname, m in self.module.named_modules():
            if id(m) in seen_modules or not isinstance(m, rules.LOCAL_TYPES):
                continue
            seen_modules.add(id(m))
            w = by_id.get(id(m.weight)) if m.weight is not None else None
            b = by_id.get(id(m.bias)) if m.bias is not None else None
            # A parameter shared with another module has one importance from all its uses:
            # only the generic per-sample rule sees all of them at once.
            w = w if w is not None and len(owners[id(m.weight)]) == 1 else None
            b = b if b is not None and len(owners[id(m.bias)]) == 1 else None
            if w is None and b is None:
                continue
            self._layers.append((mname, m, w, b))
            covered.update(n for n in (w, b) if n is not None)
        self.covered = [n for n in self._params if n in covered]
        self.uncovered = [n for n in self._params if n not in covered]

    def _refresh(self) -> None:
        """Pick up parameters added, removed or replaced since the stores were built."""
        self._stale = False
        params = self._tracked()
        if list(params) == list(self._params) and all(params[n] is self._params[n] for n in params):
            return
        old = {"omega": dict(self._omega.items()), "anchors": dict(self._anchors.items()),
               "acc": dict(self._acc.items())}
        self._build(params, old)

    @property
    def omega(self) -> dict[str, torch.Tensor]:
        """Importance per parameter name (fp32 views into the flat buffer)."""
        return self._omega.views

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        """theta*, the parameters at the last ``consolidate()``."""
        return self._anchors.views

    # ------------------------------------------------------------ estimation
    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device if self._params else torch.device("cpu")

    def _chunk(self, names: list[str]) -> int:
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        per_sample = 4 * sum(self._params[n].numel() for n in names) or 1
        return max(1, (256 << 20) // per_sample)

    def _begin_batch(self) -> None:
        self._staging.zero_()

    def _commit_batch(self, n: int) -> None:
        """Move the batch's numerators into the accumulator, unless any is not finite."""
        if not self._staging.all_finite():
            bad = self._staging.first_non_finite()
            layer = bad.rsplit(".", 1)[0] if "." in bad else bad
            raise FloatingPointError(
                f"MAS: non-finite activations or gradients in layer {layer!r} (parameter {bad!r}); "
                "this batch was not added to the importance"
            )
        for key, buf in self._staging.buffers.items():
            self._acc.buffers[key].add_(buf)
        self.num_samples += n

    def _post_act(self, name: str) -> Callable | None:
        pa = self.post_activation
        if isinstance(pa, dict):
            return pa.get(name)
        return pa

    def _local_hook(self, name: str, w: str | None, b: str | None):
        ref = weakref.ref(self)
        staging = self._staging
        act = self._post_act(name)

        def hook(module, args, output):
            mas = ref()
            if mas is None or mas._busy or not args or not isinstance(output, torch.Tensor):
                return
            x = args[0].detach()
            y = output.detach()
            if act is not None:
                y = act(y)
            acc_w = staging[w] if w is not None else torch.zeros_like(module.weight, dtype=torch.float32)
            acc_b = staging[b] if b is not None else None
            if isinstance(module, nn.Linear):
                rules.local_linear(acc_w, acc_b, x, y)
            else:
                rules.local_conv(module, acc_w, acc_b, x, y)

        return hook

    def _global_pass(self, x: torch.Tensor, names: list[str]) -> None:
        """Exact per-sample global importance of ``names`` for batch ``x`` into staging."""
        staging = self._staging
        fast = {}  # module name -> (module, w, b, [(x, y), ...])
        handles = []
        if self.importance == "global":
            wanted = set(names)
            for mname, m, w, b in self._layers:
                if isinstance(m, nn.Linear) and (w in wanted or b in wanted):
                    calls: list = []
                    fast[mname] = (m, w if w in wanted else None, b if b in wanted else None, calls)
                    handles.append(m.register_forward_hook(
                        lambda mod, args, out, calls=calls: calls.append((args[0], out))))
        generic = [n for n in names if not any(n in (v[1], v[2]) for v in fast.values())]
        if fast:
            try:
                with torch.enable_grad():
                    loss = rules.squared_norm(self.output_fn(self.module(x)))
            finally:
                _remove_handles(handles)
            usable = {k: v for k, v in fast.items() if len(v[3]) == 1 and v[3][0][0].dim() == 2
                      and v[3][0][1].requires_grad}
            for k, (m, w, b, calls) in fast.items():
                # Called several times, on N-D input, or off the output's path: per-sample rule.
                # (Never called: no gradient, so nothing to add.)
                if k not in usable and calls:
                    generic += [n for n in (w, b) if n is not None]
            if usable:
                ys = [v[3][0][1] for v in usable.values()]
                deltas = torch.autograd.grad(loss, ys, allow_unused=True, materialize_grads=True)
                for (m, w, b, calls), delta in zip(usable.values(), deltas):
                    acc_w = staging[w] if w is not None else torch.zeros_like(m.weight, dtype=torch.float32)
                    rules.global_linear(acc_w, staging[b] if b is not None else None,
                                        calls[0][0].detach(), delta)
            del loss
        if generic:
            rules.per_sample_exact(self.module, {n: self._params[n] for n in generic}, x,
                                   self.output_fn, {n: staging[n] for n in generic}, self._chunk(generic))

    def _observe_global(self, x: torch.Tensor, eval_mode: bool = True) -> None:
        """One batch for the global rules, in eval mode unless told otherwise."""
        n = int(x.shape[0])
        self._busy = True
        modes = {m: m.training for m in self.module.modules()} if eval_mode else {}
        try:
            if eval_mode:
                self.module.eval()
            self._begin_batch()
            if self.importance == "global_batch":
                names = list(self._params)
                rules.batch_abs_grad(self.module, [self._params[k] for k in names], x, self.output_fn,
                                     [self._staging[k] for k in names])
            else:
                self._global_pass(x, list(self._params))
            self._commit_batch(n)
        finally:
            self._busy = False
            _set_modes(modes)

    def _uncovered_for_local(self) -> list[str]:
        if not self.uncovered or self.uncovered_policy == "skip":
            return []
        if self.uncovered_policy == "error":
            raise ValueError(
                f"MAS(importance='local', uncovered='error'): no local rule covers {self.uncovered}; "
                "pass uncovered='global' (exact per-sample rule) or 'skip' (zero importance)"
            )
        return self.uncovered

    @contextlib.contextmanager
    def _session(self):
        """Hooks for one estimation session; requires_grad restored after.

        Estimation never writes ``.grad`` (it uses ``torch.autograd.grad`` and
        ``torch.func``), so the user's own backward passes inside
        ``accumulating()`` keep their effect.
        """
        if self._stale:
            self._refresh()
        if self._session_handles:
            raise RuntimeError("MAS: estimate()/accumulating() is already active on this wrapper")
        extra = self._uncovered_for_local() if self.importance == "local" else []
        req = {n: p.requires_grad for n, p in self._params.items()}
        ref = weakref.ref(self)
        try:
            for p in self._params.values():
                p.requires_grad_(True)  # frozen-but-included parameters need a gradient path
            if self.importance == "local":
                for mname, m, w, b in self._layers:
                    self._session_handles.append(m.register_forward_hook(self._local_hook(mname, w, b)))

                def pre(module, args):
                    mas = ref()
                    if mas is not None and not mas._busy:
                        mas._begin_batch()

                def post(module, args, output):
                    mas = ref()
                    if mas is None or mas._busy or not args:
                        return
                    x = args[0]
                    if extra:
                        # The uncovered parameters' exact rule runs its own passes, in eval mode
                        # like the global rules: per-sample gradients need sample independence.
                        mas._busy = True
                        modes = {m: m.training for m in mas.module.modules()}
                        try:
                            mas.module.eval()
                            mas._global_pass(x.detach(), extra)
                        finally:
                            mas._busy = False
                            _set_modes(modes)
                    mas._commit_batch(int(x.shape[0]))
            else:
                pre = None

                def post(module, args, output):
                    mas = ref()
                    if mas is not None and not mas._busy and args:
                        mas._observe_global(args[0].detach())

            if pre is not None:
                self._session_handles.append(self.module.register_forward_pre_hook(pre))
            self._session_handles.append(self.module.register_forward_hook(post))
            yield
        finally:
            _remove_handles(self._session_handles)
            for n, p in self._params.items():
                p.requires_grad_(req[n])

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
        """Accumulate importance over ``batches`` (inputs, or tuples/lists whose first item is the input).

        Runs the model in eval mode unless ``train_mode``; labels are ignored.
        The model's mode and every ``.grad`` are restored afterwards.
        """
        from tqdm.auto import tqdm

        device = self._device()
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
        modes = {m: m.training for m in self.module.modules()}
        with self._session():
            try:
                self.module.train(train_mode)
                for batch in tqdm(batches, total=total, disable=not progress, desc=f"MAS {self.importance}",
                                  unit="batch"):
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if not isinstance(x, torch.Tensor):
                        raise TypeError(f"MAS.estimate: expected a tensor input, got {type(x).__name__}")
                    x = x.to(device)
                    if self.importance == "local":
                        with torch.no_grad():
                            self.module(x)
                    else:
                        self._observe_global(x, eval_mode=not train_mode)
            finally:
                _set_modes(modes)
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
        if self._stale:
            self._refresh()
        from .distributed import all_reduce_importance

        n = all_reduce_importance(self._acc, self.num_samples, self.process_group)
        if n == 0:
            raise RuntimeError(
                "MAS.consolidate(): no samples seen since the last consolidate; call estimate() "
                "or run forward passes inside accumulating() first"
            )
        with torch.no_grad():
            for key, omega in self._omega.buffers.items():
                new = self._acc.buffers[key].div_(n)
                if self.num_tasks == 0:
                    omega.copy_(new)
                elif self.combine == "sum":
                    omega.add_(new)
                elif self.combine == "mean":
                    old_n = self.samples_consolidated
                    omega.mul_(old_n / (old_n + n)).add_(new, alpha=n / (old_n + n))
                else:
                    omega.mul_(self.combine).add_(new, alpha=1.0 - self.combine)
            for anchor, p in zip(self._pen_anchors, self._pen_detached):
                anchor.copy_(p)
        self._acc.zero_()
        self.samples_consolidated += n
        self.num_samples = 0
        self.num_tasks += 1
        return self

    # --------------------------------------------------------------- penalty
    def penalty(self) -> torch.Tensor:
        """``lam * sum Omega (theta - theta*)^2``, differentiable w.r.t. the parameters (one fused op)."""
        if self._stale:
            self._refresh()
        if self.num_tasks == 0 or not self._pen_params:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        return torch.ops.mas_kernels.penalty(self._pen_params, self._pen_anchors, self._pen_omegas, self.lam)[0]

    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` into each ``.grad`` (after ``backward()``); return the penalty."""
        if self._stale:
            self._refresh()
        if self.num_tasks == 0 or not self._pen_params:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        grads = [p.grad for p in self._pen_params]
        if any(g is None for g in grads):
            for i, p in enumerate(self._pen_params):
                if grads[i] is None:
                    p.grad = grads[i] = torch.zeros_like(p)
        return torch.ops.mas_kernels.penalty_grad_(self._pen_detached, self._pen_anchors, self._pen_omegas,
                                                   self.lam, grads)

    # ----------------------------------------------------------------- state
    def _meta(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "version": __version__, "importance": self.importance,
            "combine": self.combine, "lam": self.lam, "num_samples": self.num_samples,
            "samples_consolidated": self.samples_consolidated, "num_tasks": self.num_tasks,
        }

    def state_dict(self) -> dict[str, Any]:
        """Omega, anchors and the open accumulator by parameter name, plus counts and settings."""
        if self._stale:
            self._refresh()
        return {
            "omega": {n: t.detach().clone() for n, t in self._omega.items()},
            "anchors": {n: t.detach().clone() for n, t in self._anchors.items()},
            "accumulator": {n: t.detach().clone() for n, t in self._acc.items()},
            **self._meta(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``; every name and shape is checked before anything changes."""
        if self._stale:
            self._refresh()
        for key in ("omega", "anchors", "accumulator", "num_samples", "samples_consolidated", "num_tasks"):
            if key not in state:
                raise ValueError(f"MAS.load_state_dict: missing entry {key!r}")
        for part, store in (("omega", self._omega), ("anchors", self._anchors), ("accumulator", self._acc)):
            given = state[part]
            for name in store:
                if name not in given:
                    raise ValueError(f"MAS.load_state_dict: {part} has no entry for parameter {name!r}")
                t = given[name]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(store[name].shape):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(
                        f"MAS.load_state_dict: {part}[{name!r}] has shape {shape}, "
                        f"the model's parameter has {tuple(store[name].shape)}"
                    )
                if not t.dtype.is_floating_point:
                    raise ValueError(f"MAS.load_state_dict: {part}[{name!r}] has dtype {t.dtype}")
            for name in given:
                if name not in store:
                    raise ValueError(f"MAS.load_state_dict: {part} has parameter {name!r}, which the model lacks")
        for key in ("importance", "combine"):
            if key in state and state[key] != getattr(self, key):
                warnings.warn(f"MAS.load_state_dict: state was made with {key}={state[key]!r}, "
                              f"this wrapper uses {getattr(self, key)!r}", stacklevel=2)
        with torch.no_grad():
            for part, store in (("omega", self._omega), ("anchors", self._anchors), ("accumulator", self._acc)):
                for name, view in store.items():
                    view.copy_(state[part][name])
        self.num_samples = int(state["num_samples"])
        self.samples_consolidated = int(state["samples_consolidated"])
        self.num_tasks = int(state["num_tasks"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors (no pickle), atomically: a temp file renamed into place.

        Under ``torch.distributed`` every rank calls it: an open accumulator
        (samples seen since the last ``consolidate``) is summed over the ranks
        first, as one process would hold it; then rank 0 writes while the
        others wait, and an error on rank 0 is raised on every rank.
        """
        from safetensors.torch import save_file

        from .distributed import main_process_only, summed_over_ranks

        sd = self.state_dict()
        sd["accumulator"], num_samples = summed_over_ranks(sd["accumulator"], self.num_samples, self.process_group)

        def write() -> None:
            tensors = {}
            for part in ("omega", "anchors", "accumulator"):
                for name, t in sd[part].items():
                    tensors[f"{part}/{name}"] = t.contiguous().cpu()
            meta = {k: json.dumps(v) for k, v in {**self._meta(), "num_samples": num_samples}.items()}
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            fd, tmp = tempfile.mkstemp(prefix=".mas-", suffix=".tmp", dir=folder)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, os.fspath(path))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise

        main_process_only(write, self.process_group, "MAS.save")

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save`; a failed load leaves the state as it was.

        Under ``torch.distributed`` call it on every rank: all get Omega and the
        anchors; an open accumulator in the file (the sum over the ranks that
        saved it) goes to rank 0 only, so the next ``consolidate()`` counts it once.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types on bad headers / sizes
            raise ValueError(f"MAS.load: {path} is not a readable safetensors file ({exc})") from exc
        if meta.get("format") != json.dumps(_FORMAT):
            raise ValueError(f"MAS.load: {path} was not written by mas_kernels.MAS.save (format {meta.get('format')})")
        try:
            info = {k: json.loads(v) for k, v in meta.items()}
        except json.JSONDecodeError as exc:
            raise ValueError(f"MAS.load: {path} has corrupt metadata ({exc})") from exc
        state: dict[str, Any] = {"omega": {}, "anchors": {}, "accumulator": {}}
        for key, t in tensors.items():
            part, _, name = key.partition("/")
            if part not in state:
                raise ValueError(f"MAS.load: {path} has an unexpected entry {key!r}")
            state[part][name] = t
        state.update(info)
        self.load_state_dict(state)
        from .distributed import is_main_process

        if not is_main_process(self.process_group):
            # The file's open accumulator is the sum over the ranks that saved it: rank 0 alone
            # holds it, so the next consolidate() counts those samples once.
            self._acc.zero_()
            self.num_samples = 0

    # ----------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this wrapper registered (also done when it is garbage-collected)."""
        _remove_handles(self._session_handles)
        _LIVE.discard(self)

    def __repr__(self) -> str:
        return (f"MAS(importance={self.importance!r}, combine={self.combine!r}, lam={self.lam}, "
                f"params={len(self._params)}, tasks={self.num_tasks}, num_samples={self.num_samples})")
