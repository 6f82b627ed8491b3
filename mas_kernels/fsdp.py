r"""MAS on FSDP2 shards: importance, state and penalty kept per local shard.

``mk.MAS(model)`` on a model whose parameters FSDP2 (``fully_shard``) made
DTensors keeps Omega, theta* and the open accumulator for this rank's rows
only (the ``to_local()`` shard of each parameter), and the API is the one of
a single process. What runs where:

* **penalty**: elementwise on the local shards (``penalty_grad_`` on each
  rank's rows of ``p``, ``theta*``, ``Omega`` and ``.grad``); no communication.
* **local and exact importance**: each layer's rule runs on its recorded
  inputs and output gradients (all the Linear/Conv1D, Embedding and norm rules
  need) into *full-size temporaries of that layer only*, which are then
  reduce-scattered (sum) into each rank's rows: ``sum over ranks`` of every
  rank's numerators, i.e. the numerators of one process over the union of the
  ranks' samples. Rules that read the layer's weights (ConvNd, the generic
  per-sample rule, attention, RNNs, rules you registered) get the layer's FSDP
  unit unsharded (``unshard()``/``reshard()``, one all-gather) for the time
  they run. One layer's temporaries at a time: no rank ever holds the whole
  model's state.
* **global_batch**: the reduced shard gradients FSDP2 produces in its own
  backward, with the semantics the user names (``batch_ranks=``):
  ``"per_rank"`` (the default, DDP's): ``sum_r |g_{b,r}|``, the absolute
  value of each rank's batch gradient before the sum over ranks (applied to
  FSDP2's reduce-scatter input, no extra communication); ``"concatenated"``:
  ``|sum_r g_{b,r}|``, the gradient of the batch made of every rank's batch
  (one process with batches ``world_size`` times as large).
* parameters FSDP2 does not shard (``ignored_params``, e.g. LoRA adapters, or
  parameters of modules outside every ``fully_shard``) are whole on every rank
  and handled as under DDP: each rank's numerators, all-reduced at
  ``consolidate()``.

FSDP2's forward and backward are collectives, and so are the reduce-scatters
above: every rank must run the same number of batches through the same
layers. ``estimate()`` checks it before every batch (a rank that has run out
of batches while another has one raises the same error on every rank).

Only one-dimensional meshes with ``Shard(0)`` placements (FSDP2's default) are
supported; tensor parallel, HSDP meshes and ``shard_placement_fn`` placements
other than ``Shard(0)`` are refused by name.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .distributed import is_dtensor
from .state import FlatBuffers, ImportanceState, _layer

BATCH_RANKS = ("per_rank", "concatenated")


# ------------------------------------------------------------------ FSDP2 modules
def _fsdp_module_type():
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None) if mod is not None else None


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The modules of ``module`` (itself included) that ``fully_shard`` was applied to."""
    cls = _fsdp_module_type()
    if cls is None:
        return []
    return [m for m in module.modules() if isinstance(m, cls)]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` has FSDP2 units or DTensor parameters."""
    if fsdp_modules(module):
        return True
    return any(is_dtensor(p) for p in module.parameters())


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state (a no-op for those already sharded).

    After a forward under ``no_grad`` (a validation pass) FSDP2 leaves the root's parameters
    unsharded: plain tensors whose storage the next backward frees. A wrapper must never hold
    those, so it reshards before it reads the parameters. Outside forward/backward only (the
    next forward, or the pending backward's pre-hook, all-gathers them again).
    """
    for m in fsdp_modules(module):
        m.reshard()


def _groups(unit: nn.Module) -> list:
    """The FSDP2 parameter groups of one unit (torch's private state: one group up to 2.12, a list after)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


# ----------------------------------------------------------------------- layout
class Sharding:
    """Which tracked parameters are sharded (and which rows each rank holds) and which are whole.

    Args:
        module: the (unwrapped) model, already resharded.
        params: the tracked parameters by name (DTensors for the sharded ones).
        who: names the caller in errors.

    Raises ``NotImplementedError`` naming the parameter for placements other
    than ``Shard(0)`` on a one-dimensional mesh, and for parameters on
    different meshes.
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor], who: str = "MAS"):
        from torch.distributed.tensor import Shard

        self.who = who
        self.sharded: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # name -> (lo, hi, global shape)
        self.replicated: list[str] = []
        self.mesh = None
        for name, p in params.items():
            if not is_dtensor(p):
                self.replicated.append(name)
                continue
            mesh, placements = p.device_mesh, tuple(p.placements)
            if mesh.ndim != 1 or placements != (Shard(0),):
                raise NotImplementedError(
                    f"{who}: parameter {name!r} is a DTensor on a {mesh.ndim}-D mesh with placements {placements}; "
                    "sharded MAS supports FSDP2's Shard(0) on a one-dimensional mesh (fully_shard without "
                    "shard_placement_fn, no tensor parallel or HSDP); estimate on a replica and use "
                    "mas_kernels.ShardedPenalty for other layouts")
            if self.mesh is None:
                self.mesh = mesh
            elif mesh != self.mesh:
                raise NotImplementedError(f"{who}: parameter {name!r} lives on another device mesh than the "
                                          "others; sharded MAS needs one FSDP2 mesh for the whole model")
            lo, hi = rows_of(p)
            self.sharded[name] = (lo, hi, tuple(p.shape))
        if self.mesh is None:  # every tracked parameter is whole (ignored_params): the model's mesh
            self.mesh = next((q.device_mesh for q in module.parameters() if is_dtensor(q)), None)
        if self.mesh is not None:
            self.group = self.mesh.get_group()
            self.world = dist.get_world_size(self.group)
            self.rank = dist.get_rank(self.group)
        else:  # FSDP2 units whose tracked parameters are all ignored_params
            self.group, self.world, self.rank = None, 1, 0
        self.units = _units(module)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.sharded[name][2]

    def layout_text(self) -> str:
        """Names and global shapes of the sharded parameters (ranks must agree on them)."""
        return repr(sorted((n, s) for n, (_, _, s) in self.sharded.items()))


def rows_of(p: torch.Tensor) -> tuple[int, int]:
    """``(lo, hi)``: the rows of DTensor ``p`` (``Shard(0)`` on a 1-D mesh) this rank holds, as ``torch.chunk``
    splits them (FSDP2's layout; the last ranks may hold fewer rows, or none)."""
    n, world, rank = int(p.shape[0]), p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)
    lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
    local = p.to_local()
    if local.dim() == 0 or local.shape[0] != hi - lo:
        raise NotImplementedError(f"sharded MAS: a parameter of shape {tuple(p.shape)} has a local shard of "
                                  f"{tuple(local.shape)} on rank {rank} of {world}, not rows {lo}:{hi} (torch.chunk)")
    return lo, hi


def _units(module: nn.Module) -> dict[int, nn.Module]:
    """id(submodule) -> the nearest FSDP2 unit at or above it (the one that all-gathers its parameters)."""
    cls = _fsdp_module_type()
    out: dict[int, nn.Module] = {}

    def walk(m: nn.Module, unit):
        if cls is not None and isinstance(m, cls):
            unit = m
        if unit is not None:
            out[id(m)] = unit
        for child in m.children():
            walk(child, unit)

    walk(module, None)
    return out


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (``to_local()``, differentiable, where ``t`` requires grad; the raw local
    tensor otherwise, which costs no dispatch), else ``t``. A local tensor whose storage was freed
    (``data_ptr() == 0`` with elements) raises instead of handing a dangling pointer to a kernel."""
    if is_dtensor(t):
        raw = None if t.requires_grad else getattr(t, "_local_tensor", None)
        t = raw if raw is not None else t.to_local()
    if t.numel() and t.data_ptr() == 0:
        raise RuntimeError(
            "MAS: a parameter's storage has been freed (an FSDP2 unsharded parameter after its reshard); "
            "the wrapper holds sharded parameters only: build it (or ShardedPenalty) from the fully_shard-ed "
            "model, and do not swap its parameters afterwards")
    return t


def local_data(t: torch.Tensor) -> torch.Tensor:
    """:func:`local_view` without autograd, for the training step: a DTensor's raw local tensor (no dispatch)."""
    raw = getattr(t, "_local_tensor", None) if is_dtensor(t) else t
    if raw is None:
        raw = t.detach().to_local()
    if raw.numel() and raw.data_ptr() == 0:
        return local_view(raw)  # the named error
    return raw


# ----------------------------------------------------------------- numerators
# Rules that need only the layer's recorded inputs, outputs and output gradients (and shapes), never the
# weights' values: no all-gather for them. Every other rule runs with its layer's FSDP unit unsharded.
def _structural_rules() -> tuple[type, ...]:
    from .estimators.rules import embedding, linear, norm

    return (linear.LinearRule, embedding.EmbeddingRule, norm.LayerNormRule, norm.GroupNormRule,
            norm.BatchNormRule)


class ShardedStaging:
    """One batch's numerators for a sharded state: the rules see full-size tensors, the state keeps its rows.

    ``self[name]`` inside :meth:`scope` gives a full-size fp32 temporary for a
    sharded parameter (zeros, allocated on first use) and this rank's staging
    view for a whole one; leaving the scope reduce-scatters (sum over ranks)
    the temporaries of every sharded name the scope declared into each rank's
    rows, and frees them. Outside a scope a sharded name is refused.
    Everything else (``buffers``, ``zero_``, ``all_finite``...) is the local
    staging's.
    """

    def __init__(self, local: FlatBuffers, sharding: Sharding):
        self.local = local
        self.sharding = sharding
        self._names: list[str] | None = None  # the sharded names of the open scope
        self._full: dict[str, torch.Tensor] = {}

    # the FlatBuffers interface the state and the commit use
    @property
    def buffers(self):
        return self.local.buffers

    @property
    def views(self):
        return self.local.views

    def zero_(self) -> None:
        self.local.zero_()

    def all_finite(self) -> bool:
        return self.local.all_finite()

    def first_non_finite(self):
        return self.local.first_non_finite()

    def items(self):
        return self.local.items()

    def __iter__(self):
        return iter(self.local)

    def __contains__(self, name: str) -> bool:
        return name in self.local

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.sharding.sharded:
            return self.local[name]
        full = self._full.get(name)
        if full is not None:
            return full
        if self._names is None or name not in self._names:
            raise NotImplementedError(
                f"MAS: parameter {name!r} is sharded by FSDP2 and its numerators were asked for outside the turn "
                "of a layer that owns it (a rule writing it out of its scope); register a rule for the module "
                "that uses it (mas_kernels.register_rule), or use importance='local' or 'global_batch'")
        lo, hi, shape = self.sharding.sharded[name]
        chunk = -(-shape[0] // self.sharding.world)
        padded = torch.zeros((chunk * self.sharding.world, *shape[1:]), dtype=torch.float32,
                             device=self.local[name].device)
        self._full[name] = full = padded[:shape[0]]
        return full

    def per_sample_backward(self, names: list[str]) -> None:
        raise NotImplementedError(
            f"MAS: parameters {names} are sharded by FSDP2 and used outside the forward of the layers that own them, "
            "so their exact importance would need one backward pass per sample, each a collective (and ranks hold "
            "different numbers of samples); register a rule for the module that uses them "
            "(mas_kernels.register_rule), or use importance='local' or 'global_batch'")

    @contextlib.contextmanager
    def scope(self, layers: list, names: Iterable[str]) -> Iterator["ShardedStaging"]:
        """The block writes the numerators of ``names`` for ``layers``: sharded ones into full-size
        temporaries, reduce-scattered into this rank's rows when it ends (every rank must open the same
        scopes in the same order: each ends in one reduce-scatter per sharded name)."""
        if self._names is not None:  # nested (a rule calling back): the outer scope flushes
            self._names = self._names + [n for n in names if n not in self._names]
            yield self
            return
        self._names = [n for n in dict.fromkeys(names) if n in self.sharding.sharded]
        gathered = self._unshard(layers) if self._names else []
        try:
            yield self
            self.flush()
        finally:
            self._names = None
            self._full.clear()
            for unit in gathered:
                unit.reshard()

    def _unshard(self, layers: list) -> list[nn.Module]:
        """The FSDP units of layers whose rules read weights, all-gathered for the scope (in order, once)."""
        structural = _structural_rules()
        units: list[nn.Module] = []
        for layer in layers:
            if isinstance(layer.rule, structural):
                continue
            unit = self.sharding.units.get(id(layer.module))
            if unit is not None and unit not in units and any(is_dtensor(p) for p in
                                                               layer.module.parameters(recurse=False)):
                units.append(unit)
        for unit in units:
            unit.unshard()
        return units

    def flush(self) -> None:
        """Reduce-scatter the scope's temporaries into the local rows (zeros for names the rules did not write)."""
        for name in self._names or ():
            full = self._full.pop(name, None)
            lo, hi, shape = self.sharding.sharded[name]
            local = self.local[name]
            if self.sharding.world == 1:
                if full is not None:
                    local.add_(full)
                continue
            chunk = -(-shape[0] // self.sharding.world)
            if full is None:
                src = torch.zeros((chunk * self.sharding.world, *shape[1:]), dtype=torch.float32, device=local.device)
            else:
                src = full.as_strided((chunk * self.sharding.world, *shape[1:]), full.stride())  # the padded buffer
            out = torch.empty((chunk, *shape[1:]), dtype=torch.float32, device=local.device)
            dist.reduce_scatter_tensor(out, src, group=self.sharding.group)
            local.add_(out[:hi - lo])


class ShardedState(ImportanceState):
    """:class:`ImportanceState` over this rank's local shards; rules write through :class:`ShardedStaging`.

    A batch is committed or rejected on every rank alike: whether its numerators are finite (and the
    running sum too) is agreed with one small all-reduce, since a non-finite value from one rank's data
    lands in another rank's rows. A rejected batch is left out everywhere and its error is kept for
    ``consolidate()`` (a warning there, so that every rank stays in step).
    """

    def __init__(self, local: dict[str, torch.Tensor], sharding: Sharding, old: ImportanceState | None = None,
                 **kwargs):
        self.sharding = sharding
        super().__init__(local, _local_old(old, local, sharding), **kwargs)
        self._view: ShardedStaging | None = None

    @property
    def staging(self) -> ShardedStaging:
        local = ImportanceState.staging.fget(self)
        if self._view is None or self._view.local is not local:
            self._view = ShardedStaging(local, self.sharding)
        return self._view

    def release(self, staging: bool = True) -> None:
        super().release(staging)
        if staging:
            self._view = None

    def commit_batch(self, n: int, weight: float = 1.0) -> None:
        staging, acc = self.staging.local, self.acc
        for b, a in zip(staging.buffers.values(), acc.buffers.values()):
            torch.add(a, b, alpha=weight, out=b)  # the new running sum, in the staging buffers
        bad = not staging.all_finite()
        if self.sharding.group is not None:
            flag = torch.tensor([float(bad)], device=_comm_device(self.sharding.group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.sharding.group)
            anywhere = bool(flag.item())
        else:
            anywhere = bad
        if anywhere:
            where = staging.first_non_finite() if bad else None
            if self.pending is None:
                self.pending = (
                    "MAS: a batch had non-finite activations or gradients, or made the float32 sum of the importance "
                    "overflow" + (f", in layer {_layer(where)!r} (parameter {where!r})" if where else " on another "
                                  "rank") + "; it was left out of the importance on every rank (the other batches "
                    "are kept)")
            return
        acc.swap(staging)
        self.num_samples += n
        self.num_batches += 1

    def deferred(self) -> bool:
        return False


def agreement(group):
    """``agree(flag)``: a boolean AND-ed over ``group``'s ranks (each probe decision the same on every rank)."""
    if group is None or group is False:
        return None

    def agree(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return bool(t.item() > 0)

    return agree


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_old(old: ImportanceState | None, local: dict[str, torch.Tensor], sharding: Sharding):
    """A previous whole-parameter state (the model was fully_shard-ed since) sliced to this rank's rows, so
    that the values carry over by name; a sharded state as it is."""
    if old is None or isinstance(old, ShardedState):
        return old
    old.settle()
    sliced = ImportanceState.__new__(ImportanceState)
    sliced.__dict__.update(old.__dict__)
    specs = [(n, local[n].shape if n in local else shape, dev, dt) for n, shape, dev, dt in old.specs]

    def cut(buffers: FlatBuffers | None, dtype=None) -> FlatBuffers | None:
        if buffers is None:
            return None
        out = FlatBuffers([(n, s, local[n].device if n in local else d, buffers[n].dtype) for n, s, d, _ in specs],
                          dtype=dtype)
        with torch.no_grad():
            for n in out:
                if n in sharding.sharded:
                    lo, hi, _ = sharding.sharded[n]
                    out[n].copy_(buffers[n][lo:hi])
                else:
                    out[n].copy_(buffers[n])
        return out

    sliced.specs = specs
    sliced.omega = cut(old.omega)
    sliced.anchors = cut(old.anchors)
    sliced._acc = cut(old._acc) if old.has_acc() else None
    sliced._staging = None
    sliced.settle = lambda: None
    return sliced


# ------------------------------------------------------------------- batches
def in_step(batches: Iterable, sharding: Sharding, who: str = "MAS.estimate") -> Iterator:
    """``batches``, each yielded only once every rank of the mesh has one: FSDP2's forward is a collective,
    so a rank that ran out while another has a batch left would hang there. The same ``RuntimeError`` is
    raised on every rank instead (one small all-gather per batch)."""
    group = sharding.group
    if group is None:
        yield from batches
        return
    it = iter(batches)
    done = 0
    device = _comm_device(group)
    while True:
        try:
            batch = next(it)
            has = 1
        except StopIteration:
            batch, has = None, 0
        mine = torch.tensor([has], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(sharding.world)]
        dist.all_gather(every, mine, group=group)
        flags = [int(t.item()) for t in every]
        if all(flags):
            done += 1
            yield batch
            continue
        if not any(flags):
            return
        short = [r for r, f in enumerate(flags) if not f]
        raise RuntimeError(
            f"{who}: rank(s) {short} ran out of batches after {done} while the others have more; under FSDP2 "
            "every forward is a collective, so every rank must run the same number of batches (give each "
            "rank the same number, e.g. DistributedSampler(drop_last=True) or a DataLoader with drop_last=True)")


class GraphParams(dict):
    """The tracked parameters by name, where ``[name]`` is the tensor FSDP2's forward computes with (its
    unsharded parameter, once made), so that the exact rule's identity checks on the autograd graph (a
    parameter used outside its layer's forward) see the tensors the graph holds."""

    def __init__(self, params: dict, module: nn.Module):
        super().__init__(params)
        self._module = module

    def __getitem__(self, name: str):
        p = super().__getitem__(name)
        for unit in fsdp_modules(self._module):
            for group in _groups(unit):
                for fp in group.fsdp_params:
                    if fp.sharded_param is p and hasattr(fp, "_unsharded_param"):
                        return fp._unsharded_param
        return p


# ----------------------------------------------------------- the batch rule
class _AbsReduceScatter:
    """FSDP2's reduce-scatter with ``|.|`` applied to this rank's gradient first (and a plain sum)."""

    def __init__(self, take_abs: bool):
        self.take_abs = take_abs

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if self.take_abs:
            input_tensor.abs_()
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=group,
                                          async_op=async_op)


class ShardedBatchEstimator:
    r"""``global_batch`` on FSDP2 shards: one FSDP2 backward per batch, the reduced shard gradients.

    ``batch_ranks="per_rank"``: ``sum_r |g_{b,r}|`` (DDP's semantics: each
    rank's batch is a batch); ``"concatenated"``: ``|sum_r g_{b,r}|`` (the
    ranks' batches are one batch). The user's ``.grad`` are put back after.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], plan, output_fn: Callable,
                 sharding: Sharding, batch_ranks: str):
        self.module = module
        self.params = params
        self.plan = plan
        self.output_fn = output_fn
        self.sharding = sharding
        self.batch_ranks = batch_ranks

    def check(self) -> None:
        """Nothing to refuse: the batch gradient is defined for every model."""

    def run(self, batch, staging, names=None) -> None:
        from .estimators import squared_norm

        names = list(self.params)
        saved = {n: p.grad for n, p in self.params.items()}
        units = fsdp_modules(self.module)
        comms = []
        for unit in units:
            for group in _groups(unit):
                comms.append((group, group._reduce_scatter_comm, group.gradient_divide_factor,
                              group.reduce_grads))
                group._reduce_scatter_comm = _AbsReduceScatter(self.batch_ranks == "per_rank")
                group.gradient_divide_factor = 1.0  # FSDP2 then reduces with a plain sum
                group.reduce_grads = True
        try:
            for p in self.params.values():
                p.grad = None
            with torch.enable_grad():
                loss = squared_norm(self.output_fn(batch.forward()))
                loss.backward()
            whole = [n for n in names if n not in self.sharding.sharded]
            grads = {}
            for n in names:
                g = self.params[n].grad
                grads[n] = None if g is None else local_view(g)
            if whole and self.sharding.group is not None and self.batch_ranks == "concatenated":
                # parameters FSDP2 does not shard: their gradients summed over the ranks, as FSDP2 does for its own
                flat = torch.cat([grads[n].reshape(-1).float() if grads[n] is not None
                                  else torch.zeros(staging.local[n].numel(), device=staging.local[n].device)
                                  for n in whole])
                dist.all_reduce(flat, group=self.sharding.group)
                start = 0
                for n in whole:
                    k = staging.local[n].numel()
                    grads[n] = flat[start:start + k].view_as(staging.local[n])
                    start += k
            with torch.no_grad():
                for n in names:
                    if grads[n] is not None:
                        staging.local[n].add_(grads[n].float().abs())
        finally:
            for group, comm, factor, reduce in comms:
                group._reduce_scatter_comm, group.gradient_divide_factor, group.reduce_grads = comm, factor, reduce
            for n, p in self.params.items():
                p.grad = saved[n]


# ------------------------------------------------------------ the wrapper's state
def sharded_state(module: nn.Module, params: dict[str, torch.Tensor], old, process_group, **kinds
                  ) -> tuple[ShardedState, object]:
    """``MAS``'s state for an FSDP2 model, and the group its collectives use (the mesh's)."""
    sharding = Sharding(module, params)
    from .distributed import same_group

    if process_group is not None and process_group is not False and sharding.group is not None \
            and not same_group(process_group, sharding.group):
        raise ValueError("MAS: process_group= must be left out for an FSDP2 model (its mesh's group is used) or "
                         "be that group")
    local = {n: local_view(p.detach()) for n, p in params.items()}
    state = ShardedState(local, sharding, old, **kinds)
    group = sharding.group if sharding.group is not None else False
    return state, (False if process_group is False else group)


def _dtensor(local: torch.Tensor, sharding: Sharding, name: str):
    from torch.distributed.tensor import DTensor, Shard

    shape = sharding.full_shape(name)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, sharding.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def state_dict(state: ShardedState, params: dict) -> dict:
    """``MAS.state_dict()`` on shards: Omega, theta* and this rank's open accumulator as DTensors (``Shard(0)``
    on the model's mesh, like FSDP2's own state dicts) for sharded parameters, whole tensors for the others."""
    sd = state.state_dict()
    for part in ImportanceState.PARTS:
        for name in state.sharding.sharded:
            sd[part][name] = _dtensor(sd[part][name], state.sharding, name)
    return sd


def local_state(sd: dict, state: ShardedState, who: str) -> dict:
    """A state dict for the shards: DTensors become their local shards, full tensors of a sharded
    parameter's shape are cut to this rank's rows; everything else is left for the checks to judge."""
    if not isinstance(sd, dict):
        return sd
    out = dict(sd)
    for part in ImportanceState.PARTS:
        given = sd.get(part)
        if not isinstance(given, dict):
            continue
        mine = {}
        for name, t in given.items():
            if name in state.sharding.sharded and isinstance(t, torch.Tensor):
                lo, hi, shape = state.sharding.sharded[name]
                if is_dtensor(t):
                    if tuple(t.shape) != shape or rows_of(t) != (lo, hi):
                        raise ValueError(f"{who}: {part}[{name!r}] is a DTensor laid out as {tuple(t.placements)} "
                                         f"over {t.device_mesh}, not as the model's parameter")
                    t = t.to_local()
                elif tuple(t.shape) == shape:
                    t = t[lo:hi]
            mine[name] = t
        out[part] = mine
    return out


def keep_open_task(state: ShardedState) -> None:
    """After ``MAS.load``: the file's open accumulator is the sum over the ranks that saved it. Sharded rows
    are each rank's own part of it; whole parameters' entries and the counts stay on rank 0 alone, so the
    next ``consolidate()`` counts those samples once."""
    if state.sharding.rank == 0 or state.sharding.group is None:
        return
    if state.has_acc():
        with torch.no_grad():
            for name in state.sharding.replicated:
                state.acc[name].zero_()
    state.num_samples = state.num_batches = 0


def _entries(state: ShardedState) -> list[tuple[str, str, torch.dtype, tuple]]:
    out = []
    stores = {"omega": state.omega, "anchors": state.anchors}
    for part in ImportanceState.PARTS:
        for name in sorted(state.omega):
            dtype = stores[part][name].dtype if part in stores else torch.float32
            shape = state.sharding.full_shape(name) if name in state.sharding.sharded else tuple(state.omega[name].shape)
            out.append((part, name, dtype, shape))
    return out


def _gather(local: torch.Tensor, name: str, sharding: Sharding) -> torch.Tensor:
    """The whole parameter-shaped tensor of a sharded entry, from every rank's rows (an all-gather)."""
    lo, hi, shape = sharding.sharded[name]
    if sharding.world == 1:
        return local
    chunk = -(-shape[0] // sharding.world)
    padded = torch.zeros((chunk, *shape[1:]), dtype=local.dtype, device=local.device)
    padded[:hi - lo].copy_(local)
    out = torch.empty((chunk * sharding.world, *shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, padded, group=sharding.group)
    return out[:shape[0]]


def save(path: str, state: ShardedState, meta: dict, fingerprint: str, timeout: float | None) -> None:
    """``MAS.save`` on shards: the one-file format of an unsharded wrapper (it loads on any number of ranks, or
    in one process), written by rank 0 one parameter at a time as the ranks all-gather it; open accumulators
    summed over the ranks as one process would hold them. An error on rank 0 is raised on every rank."""
    from . import checkpoint, distributed

    sharding = state.sharding
    acc = {n: state.acc[n] for n in sharding.replicated} if state.has_acc() else {
        n: torch.zeros_like(state.omega[n], dtype=torch.float32) for n in sharding.replicated}
    summed, (num_samples, num_batches) = distributed.summed_over_ranks(
        acc, (state.num_samples, state.num_batches), sharding.group, fingerprint=fingerprint, timeout=timeout,
        who="MAS.save")
    meta = {**meta, "num_samples": num_samples, "num_batches": num_batches}
    entries = _entries(state)
    main = sharding.rank == 0
    writer, error = None, None
    if main:
        try:
            writer = checkpoint.StreamWriter(path, entries, meta, "MAS.save")
        except BaseException as exc:
            error = exc
    stores = {"omega": state.omega, "anchors": state.anchors}
    for part, name, dtype, _ in entries:
        if part == "accumulator":
            local = summed[name] if name in summed else (
                state.acc[name] if state.has_acc() else torch.zeros_like(state.omega[name], dtype=torch.float32))
        else:
            local = stores[part][name]
        full = _gather(local.detach(), name, sharding) if name in sharding.sharded else local
        if writer is not None and error is None:
            try:
                writer.write(full)
            except BaseException as exc:
                error = exc
        del full, local  # one gathered parameter at a time
    if writer is not None and error is None:
        try:
            writer.commit()
        except BaseException as exc:
            error = exc
    if sharding.group is not None:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_comm_device(sharding.group))
        dist.broadcast(flag, src=dist.get_global_rank(sharding.group, 0), group=sharding.group)
        if error is None and int(flag.item()):
            raise RuntimeError("MAS.save: rank 0 failed to write the file (its own error is raised there)")
    if error is not None:
        raise error


def read_rows(path: str, state: ShardedState, who: str = "MAS.load") -> tuple[dict, dict]:
    """``({part: {name: tensor}}, metadata)`` of a MAS file with this rank's rows only for sharded
    parameters (``safetensors`` ``get_slice`` reads just those bytes) and whole tensors for the others.

    The file's CRC32 of each part (over whole tensors, which no rank reads) is checked together: each rank
    takes the CRC32 of the bytes it read, one all-gather brings them together, and every rank combines
    them (:func:`checkpoint.crc32_combine`) and compares; a corrupt file raises on every rank."""
    import json

    out: dict = {p: {} for p in ImportanceState.PARTS}
    heads: dict = {}  # key -> (name, "name|dtype|shape") of the whole tensor, for the checksums
    crcs: dict = {}  # key -> (crc32 of the bytes read here, their length)
    raw: dict = {}
    try:
        _read_slices(path, state, who, out, heads, crcs, raw)
        error = None
    except BaseException as exc:
        error = exc
    agree(error, state.sharding, who)  # a rank that cannot read must not leave the others in the gather below
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{who}: {path} has corrupt metadata ({exc})") from exc
    sums = meta.pop("checksums", None)
    if sums is not None:
        _check_sums(path, sums, heads, crcs, state.sharding, who)
    return out, meta


def agree(error: BaseException | None, sharding: Sharding, who: str) -> None:
    """Raise ``error`` here and a ``RuntimeError`` on every other rank when any rank failed (one all-reduce),
    so that no rank goes on to a collective the failed one never reaches."""
    if sharding.group is not None and sharding.world > 1:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_comm_device(sharding.group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sharding.group)
        failed = bool(flag.item())
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{who}: another rank failed (its own error is raised there)")


def _read_slices(path: str, state: ShardedState, who: str, out: dict, heads: dict, crcs: dict, raw: dict) -> None:
    import json
    import os
    import zlib

    from safetensors import safe_open

    from . import checkpoint

    if not os.path.exists(path):
        raise FileNotFoundError(2, f"{who}: no such file", path)
    if os.path.isdir(path):
        raise IsADirectoryError(21, f"{who}: is a folder, not a file written by MAS.save", path)

    dtypes = {v: k for k, v in checkpoint._SAFETENSORS_DTYPES.items()}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw.update(f.metadata() or {})
            if raw.get("format") != json.dumps(checkpoint.FORMAT):
                raise ValueError(f"{who}: {path} was not written by mas_kernels.MAS.save (format {raw.get('format')})")
            for key in sorted(f.keys()):
                part, _, name = key.partition("/")
                if part not in ImportanceState.PARTS or not name:
                    raise ValueError(f"{who}: {path} has an unexpected entry {key!r}")
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                heads[key] = (name, f"{name}|{dtypes.get(piece.get_dtype(), piece.get_dtype())}|{shape}")
                if name in state.sharding.sharded:
                    lo, hi, want = state.sharding.sharded[name]
                    if shape != want:
                        raise ValueError(f"{who}: {part}[{name!r}] has shape {shape}, the model's parameter has {want}")
                    t = piece[lo:hi]
                else:
                    t = f.get_tensor(key)
                data = checkpoint._bytes(t.contiguous())
                crcs[key] = (zlib.crc32(data), len(data))
                out[part][name] = t
    except (OSError, ValueError):
        raise
    except Exception as exc:  # safetensors raises its own error types on bad headers / sizes
        raise ValueError(f"{who}: {path} is not a readable safetensors file ({exc})") from exc


def _check_sums(path: str, sums, heads: dict, crcs: dict, sharding: Sharding, who: str) -> None:
    """Every rank: the parts' CRC32s from the ranks' pieces, against the file's (a ``ValueError`` on all)."""
    from . import checkpoint

    if not isinstance(sums, dict):
        raise ValueError(f"{who}: {path} has corrupt metadata (checksums={sums!r})")
    keys = sorted(crcs)
    mine = torch.tensor([[crcs[k][0], crcs[k][1]] for k in keys], dtype=torch.int64).reshape(-1, 2)
    if sharding.group is not None and sharding.world > 1:
        every = [torch.empty_like(mine) for _ in range(sharding.world)]
        device = _comm_device(sharding.group)
        moved = [t.to(device) for t in every]
        dist.all_gather(moved, mine.to(device), group=sharding.group)
        every = [t.cpu() for t in moved]
    else:
        every = [mine]
    got: dict = {}
    for i, key in enumerate(keys):
        part = key.partition("/")[0]
        name, head = heads[key]
        if name in sharding.sharded:  # the ranks' rows, in rank order, are the whole tensor's bytes
            crc, length = 0, 0
            for table in every:
                c, n = int(table[i, 0]), int(table[i, 1])
                crc = checkpoint.crc32_combine(crc, c, n)
                length += n
        else:
            crc, length = crcs[key]
        got.setdefault(part, []).append((name, head, crc, length))
    import zlib

    for part, entries in got.items():
        if part not in sums:
            continue
        total = 0
        for _, head, crc, length in sorted(entries):
            total = zlib.crc32(head.encode(), total)
            total = checkpoint.crc32_combine(total, crc, length)
        if sums[part] != f"{total:08x}":
            raise ValueError(f"{who}: {path} is corrupt: the checksum of its {part} tensors does not match the one "
                             "written with them (the file changed after it was saved)")
