"""torch.distributed: MAS under DDP (and FSDP2) with two spawned processes, gloo on CPU.

Each spawned group runs several checks (spawning costs seconds); a worker that
hangs in a collective fails on the process group's timeout, and the parent
gives up on the group after ``JOIN_TIMEOUT`` seconds, so a hang fails the test
instead of blocking CI. With two or more GPUs the importance test also runs
on NCCL.

Data: task 1 gives rank 0 five samples in two batches and rank 1 eleven in
three; task 2 gives rank 0 six samples and rank 1 none. The single-process
reference sees the union with the same batches, so even the batch-dependent
``"global_batch"`` rule must agree.
"""

from __future__ import annotations

import copy
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mas_kernels as mk
from mas_kernels import distributed as mkd
from mas_kernels.state import FlatBuffers

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
PG_TIMEOUT = 60     # seconds a collective may wait before the worker fails
JOIN_TIMEOUT = 240  # seconds the parent waits for a whole group
RULES = ("local", "global", "global_batch")
SPLITS = {1: ([3, 2], [4, 4, 3]), 2: ([2, 4], [])}  # task -> (rank 0 batch sizes, rank 1 batch sizes)
BACKENDS = ["gloo"] + (
    ["nccl"] if torch.cuda.is_available() and torch.cuda.device_count() >= WORLD and dist.is_nccl_available() else []
)

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None


# ------------------------------------------------------------------ fixtures
def make_model(seed: int = 7) -> nn.Module:
    """Linear, BatchNorm (buffers: DDP broadcasts them in its forward), Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 3))


def _split(task: int) -> tuple[list[int], list[int]]:
    return SPLITS[task]


def shard(task: int, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches for ``task`` (the same tensors in every process)."""
    sizes = _split(task)
    x = torch.randn(sum(map(sum, sizes)), 6, generator=torch.Generator().manual_seed(100 + task))
    start = sum(sizes[0]) if rank == 1 else 0
    out = []
    for n in sizes[rank]:
        out.append(x[start:start + n])
        start += n
    return out


def union(task: int) -> list[torch.Tensor]:
    return shard(task, 0) + shard(task, 1)


def _entry(rank: int, fn, tmp: str, backend: str, *extra) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{tmp}/rdv-{backend}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=PG_TIMEOUT))
    try:
        fn(rank, Path(tmp), device, *extra)
    finally:
        dist.destroy_process_group()


def spawn(fn, tmp_path: Path, backend: str = "gloo", *extra) -> None:
    """Run ``fn(rank, tmp_path, device, *extra)`` on WORLD spawned ranks; raise on any error or on a hang."""
    ctx = mp.start_processes(_entry, args=(fn, str(tmp_path), backend, *extra), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a worker failed
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: the ranks did not finish within {JOIN_TIMEOUT} s (hang?)")


def _w_checks(rank: int, tmp: Path, device: torch.device, checks: tuple[str, ...]) -> None:
    """Run the named worker checks in order; each leaves a file per rank when it passed.

    The first failure ends the worker, and ``spawn`` then ends the other rank,
    so a rank blocked in a collective does not wait for the timeout.
    """
    for name in checks:
        try:
            WORKERS[name](rank, tmp, device)
        except BaseException:
            report = f"rank {rank}, check {name!r}:\n{traceback.format_exc()}"
            (tmp / f"error-{device.type}-{rank}.txt").write_text(report)
            raise
        (tmp / f"ok-{name}-{device.type}-{rank}").touch()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """One spawned gloo group for every DDP/FSDP2 check of this file (spawning costs seconds)."""
    tmp = tmp_path_factory.mktemp("dist")
    # "resume" last: until mas.py has the save()/load() patch it fails, which ends the group.
    checks = ("importance", "ddp_training_and_state") + (("fsdp2",) if fully_shard is not None else ()) + ("resume",)
    _write_fsdp2_state(tmp)
    try:
        spawn(_w_checks, tmp, "gloo", checks)
        error = None
    except Exception as exc:  # reported by the tests whose check did not pass
        error = exc
    return tmp, error


def _passed(group, check: str, device: str = "cpu") -> Path:
    tmp, error = group
    missing = [r for r in range(WORLD) if not (tmp / f"ok-{check}-{device}-{r}").exists()]
    if missing:
        # Every rank's own traceback, the earliest first (a rank's crash makes the others fail too).
        reports = sorted(tmp.glob(f"error-{device}-*.txt"), key=lambda f: f.stat().st_mtime_ns)
        detail = "\n".join(f.read_text() for f in reports) or str(error)
        pytest.fail(f"worker check {check!r} did not pass on rank(s) {missing}; earliest failure first:\n{detail}",
                    pytrace=False)
    return tmp


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


# -------------------------------------------------- 1. importance == one process
def _w_importance(rank: int, tmp: Path, device: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for rule in RULES:
        model = make_model().to(device)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        mas = mk.MAS(ddp, importance=rule, combine="mean")
        names = [n for n, _ in model.named_parameters()]
        assert list(mas.omega) == names, list(mas.omega)
        assert not any(n.startswith("module.") for n in mas.omega)
        seen = 0
        results[rule] = {}
        for task in (1, 2):
            batches = [b.to(device) for b in shard(task, rank)]
            if rule == "local" and task == 1:
                # Online: the user's own forward passes through the DDP wrapper, a different
                # number on each rank. (DDP broadcasts the BatchNorm buffers in the first of
                # them, even under no_grad, so every rank must make at least one.)
                ddp.eval()
                with mas.accumulating(), torch.no_grad():
                    for b in batches:
                        ddp(b)
            else:
                mas.estimate(batches)  # 2 vs 3 batches in task 1; none on rank 1 in task 2
            assert mas.num_samples == sum(len(b) for b in batches)
            mas.consolidate()
            seen += sum(map(sum, _split(task)))
            assert mas.num_samples == 0 and mas.samples_consolidated == seen and mas.num_tasks == task
            assert all(p.grad is None for p in model.parameters())  # no gradient left behind
            results[rule][task] = {n: t.detach().cpu().clone() for n, t in mas.omega.items()}
        for t in mas.anchors.values():
            a, b = gather(t.detach())
            assert torch.equal(a, b)
    torch.save(results, tmp / f"omega-{device.type}-rank{rank}.pt")


def _check_importance(tmp: Path, device: str, tol: dict) -> None:
    for rule in RULES:
        model = make_model()
        mas = mk.MAS(model, importance=rule, combine="mean")
        expected = {}
        for task in (1, 2):
            mas.estimate(union(task))
            mas.consolidate()
            expected[task] = {n: t.clone() for n, t in mas.omega.items()}
        for rank in range(WORLD):
            got = torch.load(tmp / f"omega-{device}-rank{rank}.pt")[rule]
            for task in (1, 2):
                assert list(got[task]) == list(expected[task])
                for name, want in expected[task].items():
                    assert want.abs().sum() > 0, (rule, task, name)
                    torch.testing.assert_close(got[task][name], want, **tol,
                                               msg=lambda m: f"{rule} task {task} rank {rank} {name}: {m}")


def test_ddp_importance_equals_one_process_over_the_union(group):
    """Every rule, uneven samples and batches per rank, a rank with no data: every rank = one process."""
    _check_importance(_passed(group, "importance"), "cpu", dict(atol=1e-6, rtol=1e-5))


@pytest.mark.skipif("nccl" not in BACKENDS, reason="needs 2 GPUs and NCCL")
def test_ddp_importance_nccl(tmp_path):
    spawn(_w_checks, tmp_path, "nccl", ("importance",))
    _check_importance(tmp_path, "cuda", dict(atol=1e-5, rtol=1e-4))


# ------------------------- 2. no communication in estimation or penalty; DDP; state
def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {seconds} s: rank 0 hung")
        time.sleep(0.02)


def _w_ddp_training_and_state(rank: int, tmp: Path, device: torch.device) -> None:
    import safetensors.torch as st
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    lam = 0.5
    model = make_model()
    ddp = DDP(model)
    reduced = []  # one entry per gradient bucket DDP all-reduces

    def counting_hook(state, bucket):
        reduced.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    mas = mk.MAS(ddp, importance="global", lam=lam)
    mas.estimate(shard(1, rank))
    mas.consolidate()
    with torch.no_grad():  # move away from theta*, identically on both replicas
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))

    # --- Rank 0 alone estimates with every rule and applies the penalty while rank 1 waits
    # on a file: if any of it needed a collective, rank 0 would hang and rank 1 time out.
    flag = tmp / "rank0_done"
    if rank == 0:
        for rule in RULES:
            other = mk.MAS(ddp, importance=rule)
            other.estimate(union(1))  # 5 batches here, none on rank 1
            if rule == "local":
                # Online, through the inner module: DDP's own forward broadcasts buffers
                # (BatchNorm) on its first call after a training step, even under no_grad.
                model.eval()
                with other.accumulating(), torch.no_grad():
                    ddp.module(union(2)[0])
                model.train()
            assert other.num_samples > 0
            other.remove()
        mas.estimate(shard(2, 0))  # an open accumulator on rank 0 only, consolidated below
        assert mas.num_samples == 6
        assert mas.penalty() > 0
        mas.penalty().backward()  # plain autograd from the inner parameters: DDP expects no hooks now
        assert mas.add_penalty_grad_() > 0
        for p in model.parameters():
            p.grad = None
        assert reduced == []  # no gradient bucket was reduced (nor would it have been waited for)
        flag.touch()
    else:
        _wait_for(flag, PG_TIMEOUT / 2)

    # --- A normal DDP step afterwards: DDP's buckets were not touched, gradients agree.
    reference = copy.deepcopy(model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(50 + rank))
    xs = gather(x)
    ddp.train()
    ddp(x).pow(2).mean().backward()
    assert reduced  # the training step does reduce its buckets
    value = mas.add_penalty_grad_()
    grads = flat(p.grad for p in model.parameters())
    a, b = gather(grads)
    assert torch.equal(a, b)
    reference.train()
    for xr in xs:  # DDP averages the ranks' gradients (BatchNorm uses each rank's batch statistics)
        (reference(xr).pow(2).mean() / WORLD).backward()
    expected_value = 0.0
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        d = p.detach() - mas.anchors[name]
        p.grad += 2 * lam * mas.omega[name] * d
        expected_value += lam * float((mas.omega[name] * d * d).sum())
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert abs(float(value) - expected_value) <= 1e-5 * max(1.0, expected_value)
    torch.optim.SGD(ddp.parameters(), lr=0.1).step()
    a, b = gather(flat(model.parameters()))
    assert torch.equal(a, b)

    # --- consolidate with 6 samples on rank 0 and none on rank 1: the same Omega everywhere.
    mas.consolidate()
    assert mas.num_samples == 0 and mas.samples_consolidated == 16 + 6 and mas.num_tasks == 2
    a, b = gather(flat(mas.omega.values()))
    assert torch.equal(a, b)
    a, b = gather(flat(mas.anchors.values()))
    assert torch.equal(a, b)

    # --- save(): rank 0 writes (slowly), rank 1 returns only once the file is complete.
    real_save, calls = st.save_file, []

    def slow_save(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)
        return real_save(*args, **kwargs)

    st.save_file = slow_save
    path = tmp / "mas.safetensors"
    try:
        mas.save(path)
    finally:
        st.save_file = real_save
    assert path.exists()
    assert [int(c) for c in gather(torch.tensor([len(calls)]))] == [1, 0]
    with open(path, "rb") as f:
        assert b"module." not in f.read(4096)  # names in the header carry no DDP prefix
    # load() on every rank, into a DDP-wrapped and into a bare model.
    for target in (DDP(make_model(seed=99)), make_model(seed=99)):
        fresh = mk.MAS(target, importance="global", lam=lam)
        fresh.load(path)
        assert (fresh.num_tasks, fresh.samples_consolidated) == (2, 22)
        for name in mas.omega:
            assert torch.equal(fresh.omega[name], mas.omega[name])
            assert torch.equal(fresh.anchors[name], mas.anchors[name])

    # --- a failure on rank 0 inside main_process_only reaches every rank (no barrier hang).
    def boom():
        raise OSError("disk full")

    if rank == 0:
        with pytest.raises(OSError, match="disk full"):
            mkd.main_process_only(boom)
    else:
        with pytest.raises(RuntimeError, match="rank 0 failed"):
            mkd.main_process_only(boom)
    assert mkd.main_process_only(lambda: 42) == (42 if rank == 0 else None)

    # --- ranks that track different parameters: a clear error on both, not a hang.
    odd = mk.MAS(make_model() if rank == 0 else nn.Linear(6, 3), importance="local", process_group=dist.group.WORLD)
    odd.estimate(shard(1, rank))
    with pytest.raises(RuntimeError, match="ranks track different parameters"):
        odd.consolidate()


def test_ddp_estimation_and_penalty_never_communicate_and_state_is_shared(group):
    """Estimation and penalty on one rank only finish; a DDP step after them agrees; save/load."""
    _passed(group, "ddp_training_and_state")


# ------------------------------------------- mid-task checkpoint (needs the mas.py patch)
def _w_resume(rank: int, tmp: Path, device: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    mas = mk.MAS(ddp, importance="global")
    mas.estimate(shard(1, rank))  # open accumulators: 5 samples on rank 0, 11 on rank 1
    path = tmp / "mid-task.safetensors"
    mas.save(path)  # the file holds the sum over the ranks, as one process would
    resumed = mk.MAS(ddp, importance="global")
    resumed.load(path)  # rank 0 takes the open accumulator, the others start from zero
    assert resumed.num_samples == (16 if rank == 0 else 0)
    resumed.consolidate()
    mas.consolidate()
    assert resumed.samples_consolidated == mas.samples_consolidated == 16
    for name in mas.omega:
        torch.testing.assert_close(resumed.omega[name], mas.omega[name])
    bad = tmp / "no-such-folder" / "mas.safetensors"  # a save that fails on rank 0 fails everywhere
    with pytest.raises(FileNotFoundError if rank == 0 else RuntimeError):
        mas.save(bad)


def test_ddp_mid_task_checkpoint_resumes_exactly(group):
    """save() with samples not yet consolidated, load() on every rank, consolidate(): as if never saved."""
    _passed(group, "resume")


# ------------------------------------------------------------------- 3. FSDP2
def _w_fsdp2(rank: int, tmp: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    mesh = init_device_mesh("cpu", (WORLD,))
    model = make_model(seed=11)  # differs from theta* in the state file
    replica = copy.deepcopy(model)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.eval()
    replica.eval()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in replica.named_parameters()]
    assert mkd.first_dtensor(dict(model.named_parameters())) == "0.weight"

    # The wrapper takes FSDP2 shards (tests/test_fsdp.py); the check for whole parameters still names them.
    assert mk.MAS(model).omega["0.weight"].shape == model[0].weight.to_local().shape
    with pytest.raises(NotImplementedError, match="'0.weight' is a DTensor.*ShardedPenalty"):
        mkd.check_unsharded(model, dict(model.named_parameters()))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    fsdp1 = FSDP1(make_model(), device_id=torch.device("cpu"))  # flat sharded parameters
    with pytest.raises(NotImplementedError, match="the model is a FullyShardedDataParallel"):
        mkd.check_unsharded(fsdp1, dict(fsdp1.named_parameters()))

    path = tmp / "state.safetensors"
    pen = mk.ShardedPenalty(model, path)
    assert pen.lam == 0.7 and pen.skipped == []
    state = load_file(path)
    omega = {n: state[f"omega/{n}"] for n in pen.names}
    anchor = {n: state[f"anchors/{n}"] for n in pen.names}
    for n, p in model.named_parameters():  # local shards: this rank's rows only
        assert pen.omega[n].shape == p.to_local().shape
        assert pen.omega[n].numel() < omega[n].numel() or p.dim() == 0

    def expected_grads(inputs):
        replica.zero_grad()
        for xr in inputs:
            (replica(xr).pow(2).mean() / WORLD).backward()
        value = 0.0
        for n, p in replica.named_parameters():
            d = p.detach() - anchor[n]
            p.grad += 2 * pen.lam * omega[n] * d
            value += pen.lam * float((omega[n] * d * d).sum())
        return value, [p.grad for p in replica.parameters()]

    def check(value):
        total = value.detach().clone()
        dist.all_reduce(total)  # each rank holds its shards' part of the penalty
        assert abs(float(total) - want_value) <= 1e-5 * max(1.0, want_value)
        for (n, p), w in zip(model.named_parameters(), want_grads):
            torch.testing.assert_close(p.grad.full_tensor(), w, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")

    # Fused: task backward under FSDP2 (reduce-scatter), then the penalty into local grad shards.
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(60 + rank))
    want_value, want_grads = expected_grads(gather(x))
    model(x).pow(2).mean().backward()
    check(pen.add_penalty_grad_())

    # Differentiable, taken after the forward (the root's parameters are unsharded then): one backward.
    model.zero_grad()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(70 + rank))
    want_value, want_grads = expected_grads(gather(x))
    out = model(x)
    value = pen.penalty()
    (out.pow(2).mean() + value).backward()
    check(value)


def _write_fsdp2_state(tmp: Path) -> None:
    mas = mk.MAS(make_model(), importance="global", lam=0.7)
    mas.estimate(union(1))
    mas.consolidate()
    mas.save(tmp / "state.safetensors")


@pytest.mark.skipif(fully_shard is None, reason="needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
def test_fsdp2_wrapper_raises_and_sharded_penalty_is_exact(group):
    """FSDP2 on gloo/CPU: MAS(model) raises; ShardedPenalty on local shards = the full penalty's gradient."""
    _passed(group, "fsdp2")


WORKERS = {"importance": _w_importance, "ddp_training_and_state": _w_ddp_training_and_state, "fsdp2": _w_fsdp2,
           "resume": _w_resume}


# ------------------------------------------------------- single process, no spawn
def test_helpers_without_torch_distributed():
    assert not mkd.active() and mkd.is_main_process()
    mkd.barrier()
    assert mkd.main_process_only(lambda: 3) == 3
    acc = FlatBuffers([(n, p.shape, p.device, p.dtype) for n, p in make_model().named_parameters()])
    assert mkd.all_reduce_importance(acc, 5) == 5
    assert mkd.first_dtensor(dict(make_model().named_parameters())) is None
    model = make_model()
    mkd.check_unsharded(model, dict(model.named_parameters()))
    named = {"w": torch.ones(2)}
    assert mkd.summed_over_ranks(named, 4) == (named, 4)


def test_sharded_penalty_on_a_plain_model_equals_mas(tmp_path):
    """ShardedPenalty on whole parameters is MAS's penalty; new parameters are skipped; bad states raise."""
    model = make_model()
    mas = mk.MAS(model, importance="global", lam=0.3)
    mas.estimate(union(1))
    mas.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    mas.save(tmp_path / "s.safetensors")
    for state in (mas.state_dict(), tmp_path / "s.safetensors", str(tmp_path / "s.safetensors")):
        pen = mk.ShardedPenalty(model, state)
        assert pen.lam == 0.3
        torch.testing.assert_close(pen.penalty(), mas.penalty())
        model.zero_grad()
        v1 = pen.add_penalty_grad_()
        g1 = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        v2 = mas.add_penalty_grad_()
        torch.testing.assert_close(v1, v2)
        for a, b in zip(g1, (p.grad for p in model.parameters())):
            torch.testing.assert_close(a, b)
        model.zero_grad()
        pen.penalty().backward()
        for a, b in zip(g1, (p.grad for p in model.parameters())):
            torch.testing.assert_close(a, b)
    grown = nn.Sequential(*model, nn.Linear(3, 2))  # a new head: no state, no penalty
    pen = mk.ShardedPenalty(grown, mas.state_dict(), lam=2.0)
    assert pen.skipped == ["4.weight", "4.bias"] and pen.lam == 2.0
    with pytest.raises(ValueError, match="'0.weight'.*shape"):
        mk.ShardedPenalty(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 3)),
                           mas.state_dict())
    with pytest.raises(ValueError, match="model lacks"):
        mk.ShardedPenalty(nn.Sequential(nn.Linear(6, 12)), mas.state_dict())
    for bad in (-1.0, float("nan"), float("inf")):  # issue 21 item 18: a negative lam rewards drift
        with pytest.raises(ValueError, match="lam="):
            mk.ShardedPenalty(model, mas.state_dict(), lam=bad)
        with pytest.raises(ValueError, match="the state's lam"):
            mk.ShardedPenalty(model, {**mas.state_dict(), "lam": bad})
    pen = mk.ShardedPenalty(model, mas.state_dict())
    with pytest.raises(ValueError, match="lam=-2.0"):
        pen.lam = -2.0
    assert pen.lam == 0.3
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        mk.ShardedPenalty(model, tmp_path / "junk")
