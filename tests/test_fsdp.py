"""MAS on FSDP2 shards, two spawned gloo ranks on CPU, against one process over the union of the data.

One spawned group runs every check of this file in order (spawning and importing transformers cost
seconds); each check leaves, per rank, an ``ok-`` file and the tensors the parent compares with the
float64 oracles of ``tests/reference.py`` (or the files it reads). A hang fails on the process group's
timeout, and the parent gives up after ``JOIN_TIMEOUT`` seconds.

Data: rank 0 gets batches of 3 and 2 samples, rank 1 of 4 and 4 (FSDP2's forward is a collective: the
same number of batches on every rank, of any size).
"""

from __future__ import annotations

import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mas_kernels as mk
from tests import reference as ref
from tests.test_distributed import PG_TIMEOUT, WORLD, spawn

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo"),
    pytest.mark.skipif(fully_shard is None, reason="needs torch.distributed.fsdp.fully_shard (torch >= 2.6)"),
]

try:
    import peft  # noqa: F401
    HAVE_PEFT = True
except ImportError:
    HAVE_PEFT = False

SIZES = ([3, 2], [4, 4])  # rank -> batch sizes
RULES = (("local", "per_rank"), ("global", "per_rank"), ("global_batch", "per_rank"),
         ("global_batch", "concatenated"))


# ------------------------------------------------------------------ fixtures
def mlp(seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.LayerNorm(12), nn.Linear(12, 5))


def randomized(model: nn.Module) -> nn.Module:
    from tests.models import randomize_norms

    return randomize_norms(model)


def batches(rank: int, seed: int = 100) -> list[torch.Tensor]:
    x = torch.randn(sum(map(sum, SIZES)), 6, generator=torch.Generator().manual_seed(seed))
    start, out = (0 if rank == 0 else sum(SIZES[0])), []
    for n in SIZES[rank]:
        out.append(x[start:start + n])
        start += n
    return out


def tokens(rank: int, vocab: int = 40, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (sum(map(sum, SIZES)), 6), generator=g)
    start, out = (0 if rank == 0 else sum(SIZES[0])), []
    for n in SIZES[rank]:
        out.append(ids[start:start + n])
        start += n
    return out


def union(make=batches) -> list[torch.Tensor]:
    return make(0) + make(1)


def concatenated(make=batches) -> list[torch.Tensor]:
    return [torch.cat([a, b]) for a, b in zip(make(0), make(1))]


def shard_mlp(model: nn.Module, mesh, **kw) -> nn.Module:
    fully_shard(model[0], mesh=mesh, **kw)
    fully_shard(model[3], mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def gpt2():
    from tests.models import gpt2 as make

    torch.manual_seed(3)
    return make().eval()


def logits(out):
    return out.logits


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def omega_of(mas) -> dict[str, torch.Tensor]:
    """The whole Omega, gathered from the shards (the test's own all-gathers)."""
    return {n: full(t) for n, t in mas.state_dict()["omega"].items()}


def save_result(tmp: Path, key: str, rank: int, value) -> None:
    torch.save(value, tmp / f"{key}-rank{rank}.pt")


def load_result(tmp: Path, key: str, rank: int = 0):
    return torch.load(tmp / f"{key}-rank{rank}.pt")


# ------------------------------------------------------------------ workers
def _w_rules_mlp(rank: int, tmp: Path, mesh) -> None:
    """Every rule on a sharded MLP (a LayerNorm in the root's unit), and the penalty on shards."""
    out = {}
    for rule, batch_ranks in RULES:
        model = shard_mlp(randomized(mlp()), mesh)
        mas = mk.MAS(model, importance=rule, batch_ranks=batch_ranks)
        assert mas.omega["0.weight"].shape == model[0].weight.to_local().shape  # local shards only
        mas.estimate(batches(rank))
        assert mas.num_samples == sum(SIZES[rank])
        mas.consolidate()
        assert mas.samples_consolidated == sum(map(sum, SIZES))
        out[(rule, batch_ranks)] = omega_of(mas)
        assert all(p.grad is None for p in model.parameters())  # estimation leaves no gradient behind
    # online, the user's own forwards inside accumulating() (the global rules replay each call on the shards)
    for rule in ("local", "global"):
        online = shard_mlp(randomized(mlp()), mesh)
        acc = mk.MAS(online, importance=rule)
        online.eval()
        with acc.accumulating(), torch.no_grad():
            for b in batches(rank):
                online(b)
        acc.consolidate()
        out[("online", rule)] = omega_of(acc)
    # the penalty on shards: add_penalty_grad_ and penalty() after a training step's backward
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    x = batches(rank, seed=9)[0]
    model(x).pow(2).mean().backward()
    value = mas.add_penalty_grad_()
    total = value.detach().clone()
    dist.all_reduce(total)
    out["penalty"] = (float(total), {n: full(p.grad) for n, p in model.named_parameters()},
                      {n: full(p) for n, p in model.named_parameters()})
    out["xs"] = [batches(r, seed=9)[0] for r in range(WORLD)]
    out["anchors"] = {n: full(t) for n, t in mas.state_dict()["anchors"].items()}
    save_result(tmp, "mlp", rank, out)


def _w_gpt2(rank: int, tmp: Path, mesh) -> None:
    """A small GPT-2 (tied embedding and head), blocks sharded; then GPT-2 + LoRA with the adapters as
    ignored_params (whole on every rank, summed like DDP)."""
    out = {}
    for rule in ("local", "global", "global_batch"):
        model = gpt2()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        mas = mk.MAS(model, importance=rule, output_fn=logits)
        mas.estimate(tokens(rank))
        mas.consolidate()
        out[rule] = omega_of(mas)
    if HAVE_PEFT:
        from peft import LoraConfig, get_peft_model

        for rule in ("local", "global"):
            torch.manual_seed(11)
            model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                      init_lora_weights=False))
            lora = {p for n, p in model.named_parameters() if "lora_" in n}
            for block in model.base_model.model.transformer.h:
                fully_shard(block, mesh=mesh, ignored_params=lora)
            fully_shard(model, mesh=mesh, ignored_params=lora)
            mas = mk.MAS(model, importance=rule, output_fn=logits)
            assert mas.tracked and all("lora_" in n for n in mas.tracked)
            mas.estimate(tokens(rank))
            mas.consolidate()
            out[("lora", rule)] = omega_of(mas)
    save_result(tmp, "gpt2", rank, out)


def _w_precision(rank: int, tmp: Path, mesh) -> None:
    """bf16 MixedPrecisionPolicy; activation checkpointing (names without _checkpoint_wrapped_module);
    a block compiled on its own (names without _orig_mod)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    out = {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for rule in ("local", "global"):
        mas = mk.MAS(shard_mlp(randomized(mlp()), mesh, mp_policy=policy), importance=rule)
        mas.estimate(batches(rank))
        mas.consolidate()
        out[("bf16", rule)] = omega_of(mas)
    model = randomized(mlp())
    model[0] = checkpoint_wrapper(model[0])
    model[3] = checkpoint_wrapper(model[3])
    mas = mk.MAS(shard_mlp(model, mesh), importance="global")
    mas.estimate(batches(rank))
    mas.consolidate()
    out["checkpoint"] = omega_of(mas)
    model = randomized(mlp())
    model[3] = torch.compile(model[3], backend="aot_eager")
    mas = mk.MAS(shard_mlp(model, mesh), importance="global")
    mas.estimate(batches(rank))
    mas.consolidate()
    out["compile"] = omega_of(mas)
    save_result(tmp, "precision", rank, out)


def _w_regressions(rank: int, tmp: Path, mesh) -> None:
    """The crash, the silent zero and the hang of issue 22, each as it was reported."""
    state = tmp / "plain.safetensors"  # written by the parent: one process, union of the data
    # 1. crash: ShardedPenalty (and MAS) built after a no_grad forward (the root left unsharded), then a
    #    backward (which frees the unsharded storage), then add_penalty_grad_(): SIGABRT/SIGSEGV before.
    model = mlp(seed=11)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = batches(rank, seed=21)[0]
    with torch.no_grad():
        model(x)
    assert not hasattr(model[3].weight, "to_local")  # the root's parameters are unsharded now
    pen = mk.ShardedPenalty(model, state)
    mas = mk.MAS(model, importance="global")
    assert all(hasattr(p, "to_local") for p in model.parameters())  # resharded by the wrappers
    model(x).pow(2).mean().backward()
    value = pen.add_penalty_grad_()
    mas.add_penalty_grad_()  # no task yet: nothing, but no crash either
    total = value.detach().clone()
    dist.all_reduce(total)
    save_result(tmp, "crash", rank, (float(total), {n: full(p.grad) for n, p in model.named_parameters()},
                                     [batches(r, seed=21)[0] for r in range(WORLD)]))

    # 2. silent zero: estimate + consolidate on the plain model, then fully_shard the same object.
    model = mlp(seed=12)
    mas = mk.MAS(model, importance="global", lam=0.5, process_group=False)
    mas.estimate(union())
    mas.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    value = mas.add_penalty_grad_()
    assert float(value) > 0
    assert mas.omega["0.weight"].shape == model[0].weight.to_local().shape  # the state follows, sliced
    total = value.detach().clone()
    dist.all_reduce(total)
    save_result(tmp, "silent", rank, (float(total), {n: full(p.grad) for n, p in model.named_parameters()}))

    # 3. hang: a wrapper used on rank 0 alone (estimate, consolidate, save) in a distributed job.
    flag = tmp / "rank0-alone-done"
    if rank == 0:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            alone = mk.MAS(mlp(), importance="global")  # a plain model, no group given: no collective
        assert any("neither DDP-wrapped nor FSDP2-sharded" in str(w.message) for w in seen)
        alone.estimate(batches(0))
        alone.consolidate()
        alone.save(tmp / "alone.safetensors")
        flag.touch()
    else:
        deadline = time.monotonic() + PG_TIMEOUT / 2
        while not flag.exists():
            assert time.monotonic() < deadline, "rank 0 hung in a rank-0-only estimate/save"
            time.sleep(0.02)
    # 4. a parameter used outside its layer's forward (the exact rule's per-sample fallback) is refused on
    #    shards by name (one backward per sample would be a collective per sample).
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.nn.functional.linear(x, self.a.weight))

    torch.manual_seed(0)
    tied = Tied()
    fully_shard(tied, mesh=mesh)
    with pytest.raises(NotImplementedError, match=r"\['a.weight'\] are sharded by FSDP2 and used outside"):
        mk.MAS(tied, importance="global").estimate(batches(rank))
    # 5. ranks that run different numbers of batches: one named error on every rank, no hang.
    model = shard_mlp(mlp(), mesh)
    mas = mk.MAS(model, importance="local")
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] ran out of batches after 1"):
        mas.estimate(batches(rank)[:1] if rank == 1 else batches(rank))


def _w_files(rank: int, tmp: Path, mesh) -> None:
    """2 ranks -> 1 file (mid-task and consolidated); 1 process's file -> 2 ranks; ShardedPenalty slices."""
    import safetensors

    model = shard_mlp(randomized(mlp()), mesh)
    mas = mk.MAS(model, importance="global", lam=0.7)
    mas.estimate(batches(rank))
    mas.save(tmp / "mid.safetensors")  # open accumulators: summed over the ranks into the file
    mas.consolidate()
    mas.estimate([b * 0.5 for b in batches(rank)])
    mas.consolidate()
    mas.save(tmp / "sharded.safetensors")
    save_result(tmp, "files", rank, omega_of(mas))

    # the one-process file (parent) loaded on 2 ranks, each reading its own rows; a mid-task file too
    loaded = mk.MAS(shard_mlp(mlp(seed=1), mesh), importance="global", lam=0.7)
    loaded.load(tmp / "plain-mid.safetensors")
    assert loaded.num_samples == (sum(map(sum, SIZES)) if rank == 0 else 0)  # the open task counted once
    loaded.consolidate()
    loaded.estimate(batches(rank, seed=300))
    loaded.consolidate()
    save_result(tmp, "loaded", rank, ({n: full(t) for n, t in loaded.state_dict()["anchors"].items()},
                                      omega_of(loaded)))

    # a file changed after it was saved, in rows only rank 1 reads: the ranks' CRC32s, combined, catch it on both
    bad = tmp / "corrupt.safetensors"
    if rank == 0:
        raw = bytearray((tmp / "plain.safetensors").read_bytes())
        from safetensors import safe_open

        with safe_open(tmp / "plain.safetensors", framework="pt"):
            header = 8 + int.from_bytes(raw[:8], "little")
            import json

            start, end = json.loads(raw[8:header])["omega/0.weight"]["data_offsets"]
        raw[header + end - 2] ^= 0x40  # the last row of omega/0.weight: rank 1's
        bad.write_bytes(bytes(raw))
    dist.barrier()
    with pytest.raises(ValueError, match="is corrupt: the checksum of its omega tensors"):
        mk.MAS(shard_mlp(mlp(), mesh), importance="global").load(bad)

    # ShardedPenalty reads only this rank's rows of the sharded parameters, and keeps fp32 anchors
    # of a bf16 model unrounded with anchor_dtype=torch.float32.
    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    safetensors.safe_open = Recording
    try:
        bf16 = shard_mlp(mlp().to(torch.bfloat16), mesh)
        pen = mk.ShardedPenalty(bf16, tmp / "plain.safetensors", anchor_dtype=torch.float32)
    finally:
        safetensors.safe_open = real
    assert read == [], read  # every tensor came through get_slice: this rank's rows only
    assert pen.anchors["0.weight"].dtype == torch.float32
    lo = 0 if rank == 0 else 6
    from safetensors.torch import load_file

    whole = load_file(tmp / "plain.safetensors")
    assert torch.equal(pen.anchors["0.weight"], whole["anchors/0.weight"][lo:lo + 6])
    assert torch.equal(pen.omega["3.weight"], whole["omega/3.weight"][(0, 3)[rank]:(3, 5)[rank]])
    with pytest.raises(ValueError, match="lam=-1.0"):
        mk.ShardedPenalty(bf16, tmp / "plain.safetensors", lam=-1.0)
    with pytest.raises(ValueError, match="lam=-0.5"):
        pen.lam = -0.5


def _w_ddp_items(rank: int, tmp: Path, mesh) -> None:
    """Issue 21, items 19-20 under DDP: options fingerprint, a non-finite batch on one rank, timeout=."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # 19. different options on the ranks: the same named error on both, not different Omegas.
    ddp = DDP(mlp())
    mas = mk.MAS(ddp, importance="global", combine="sum" if rank == 0 else "mean")
    mas.estimate(batches(rank))
    with pytest.raises(RuntimeError, match="other MAS options"):
        mas.consolidate()
    # 20a. a non-finite batch on rank 1: a warning there, ranks in step, the other batches kept.
    mas = mk.MAS(ddp, importance="global")
    mine = batches(rank)
    if rank == 1:
        mine = [mine[0], torch.full_like(mine[1], float("nan"))]
    mas.estimate(mine)  # no raise out of estimate() on rank 1: the other rank would wait forever
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mas.consolidate()
    assert any("non-finite" in str(w.message) for w in seen) == (rank == 1)
    assert mas.samples_consolidated == sum(SIZES[0]) + SIZES[1][0]
    save_result(tmp, "nonfinite", rank, {n: t.clone() for n, t in mas.omega.items()})
    # and on shards: the step with the bad batch is left out on every rank
    smas = mk.MAS(shard_mlp(mlp(), mesh), importance="global")
    smas.estimate(mine)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        smas.consolidate()
    assert any("non-finite" in str(w.message) for w in seen)
    assert smas.samples_consolidated == SIZES[0][0] + SIZES[1][0]
    save_result(tmp, "nonfinite-shards", rank, omega_of(smas))
    # 20b. a rank that never reaches consolidate(): TimeoutError naming it on the rank that waited
    # (a group of its own: the timed-out collective stays pending in it).
    group = dist.new_group(list(range(WORLD)))
    late = mk.MAS(mlp(), importance="local", process_group=group)
    late.estimate(batches(rank))
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"MAS.consolidate: not every rank.*timeout=1.0 s"):
            late.consolidate(timeout=1.0)
        assert time.monotonic() - t0 < 10


CHECKS = ("rules_mlp", "gpt2", "precision", "regressions", "files", "ddp_items")
WORKERS = {"rules_mlp": _w_rules_mlp, "gpt2": _w_gpt2, "precision": _w_precision, "regressions": _w_regressions,
           "files": _w_files, "ddp_items": _w_ddp_items}


def _w_all(rank: int, tmp: Path, device, checks) -> None:
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    for name in checks:
        t0 = time.monotonic()
        try:
            WORKERS[name](rank, tmp, mesh)
        except BaseException:
            (tmp / f"error-{name}-{rank}.txt").write_text(f"rank {rank}, check {name!r}:\n{traceback.format_exc()}")
            raise
        (tmp / f"ok-{name}-{rank}").write_text(f"{time.monotonic() - t0:.1f} s")
        dist.barrier()


def _parent_files(tmp: Path) -> None:
    model = mlp()
    mas = mk.MAS(model, importance="global", lam=0.7)
    mas.estimate(union())
    mas.save(tmp / "plain-mid.safetensors")
    mas.consolidate()
    mas.save(tmp / "plain.safetensors")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _parent_files(tmp)
    try:
        spawn(_w_all, tmp, "gloo", CHECKS)
        error = None
    except Exception as exc:  # reported by the tests whose check did not pass
        error = exc
    return tmp, error


def passed(group, check: str) -> Path:
    tmp, error = group
    missing = [r for r in range(WORLD) if not (tmp / f"ok-{check}-{r}").exists()]
    if missing:
        reports = sorted(tmp.glob("error-*.txt"), key=lambda f: f.stat().st_mtime_ns)
        detail = "\n".join(f.read_text() for f in reports) or str(error)
        pytest.fail(f"worker check {check!r} did not pass on rank(s) {missing}; earliest failure first:\n{detail}",
                    pytrace=False)
    return tmp


def close(got: dict, want: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for name, w in want.items():
        assert w.abs().sum() > 0, (what, name)
        torch.testing.assert_close(got[name].double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {name}: {m}")


def expected(rule: str, batch_ranks: str, model: nn.Module, make=batches, output_fn=lambda o: o):
    model.eval()
    if rule == "local":
        return ref.local_hebbian(model, union(make), sum(map(sum, SIZES)))
    if rule == "global":
        return ref.global_exact(model, union(make), output_fn)
    xs = union(make) if batch_ranks == "per_rank" else concatenated(make)
    return ref.global_batch(model, xs, output_fn)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("rule,batch_ranks", RULES)
def test_every_rule_on_a_sharded_mlp_equals_one_process(group, rule, batch_ranks):
    tmp = passed(group, "rules_mlp")
    want = expected(rule, batch_ranks, randomized(mlp()))
    for rank in range(WORLD):
        close(load_result(tmp, "mlp", rank)[(rule, batch_ranks)], want, f"{rule}/{batch_ranks} rank {rank}")


@pytest.mark.parametrize("rule", ["local", "global"])
def test_accumulating_on_shards_equals_one_process(group, rule):
    tmp = passed(group, "rules_mlp")
    close(load_result(tmp, "mlp", 1)[("online", rule)], expected(rule, "per_rank", randomized(mlp())), f"online {rule}")


def test_penalty_on_shards_equals_the_full_penalty(group):
    tmp = passed(group, "rules_mlp")
    got = load_result(tmp, "mlp")
    total, grads, params = got["penalty"]
    omega, anchors = got[("global_batch", "concatenated")], got["anchors"]
    replica = randomized(mlp())
    with torch.no_grad():
        for n, p in replica.named_parameters():
            p.copy_(params[n])
    for x in got["xs"]:  # FSDP2 averages the ranks' gradients
        (replica(x).pow(2).mean() / WORLD).backward()
    value = 0.0
    for n, p in replica.named_parameters():
        d = p.detach().double() - anchors[n].double()
        value += float((omega[n].double() * d * d).sum())
        want = p.grad.double() + 2 * omega[n].double() * d
        torch.testing.assert_close(grads[n].double(), want, rtol=1e-5, atol=1e-6)
    assert abs(total - value) <= 1e-5 * max(1.0, value)


def test_gpt2_sharded_every_rule_equals_one_process(group):
    tmp = passed(group, "gpt2")
    got = load_result(tmp, "gpt2")
    for rule in ("local", "global", "global_batch"):
        close(got[rule], expected(rule, "per_rank", gpt2(), tokens, logits), f"gpt2 {rule}", rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed (pip install peft): GPT-2 + LoRA not tested")
def test_gpt2_lora_adapters_as_ignored_params_equal_one_process(group):
    from peft import LoraConfig, get_peft_model

    tmp = passed(group, "gpt2")
    got = load_result(tmp, "gpt2")
    for rule in ("local", "global"):
        torch.manual_seed(11)
        model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
        model.requires_grad_(True)  # the oracle differentiates every parameter; the adapters' values are the same
        want = expected(rule, "per_rank", model, tokens, logits)
        want = {n: t for n, t in want.items() if "lora_" in n}
        close(got[("lora", rule)], want, f"lora {rule}", rtol=2e-5, atol=2e-6)


def test_bf16_mixed_precision_checkpointing_and_compile(group):
    tmp = passed(group, "precision")
    got = load_result(tmp, "precision")
    for rule in ("local", "global"):  # bf16 compute: within bf16's rounding of the fp32 result
        want = expected(rule, "per_rank", randomized(mlp()))
        scale = {n: float(w.abs().max()) for n, w in want.items()}
        for n, w in want.items():
            err = float((got[("bf16", rule)][n].double() - w).abs().max())
            assert err <= 3e-2 * scale[n], (rule, n, err, scale[n])
    want = expected("global", "per_rank", randomized(mlp()))
    close(got["checkpoint"], want, "activation checkpointing")
    close(got["compile"], want, "compiled block")


def test_crash_silent_zero_and_hang_of_issue_22(group):
    tmp = passed(group, "regressions")
    from safetensors.torch import load_file

    state = load_file(tmp / "plain.safetensors")
    total, grads, xs = load_result(tmp, "crash")
    replica = mlp(seed=11)
    for x in xs:
        (replica(x).pow(2).mean() / WORLD).backward()
    value = 0.0
    for n, p in replica.named_parameters():
        d = p.detach() - state[f"anchors/{n}"]
        value += 0.7 * float((state[f"omega/{n}"] * d * d).sum())
        torch.testing.assert_close(grads[n], p.grad + 2 * 0.7 * state[f"omega/{n}"] * d, rtol=1e-5, atol=1e-6)
    assert abs(total - value) <= 1e-5 * max(1.0, value)

    total, grads = load_result(tmp, "silent")
    model = mlp(seed=12)
    mas = mk.MAS(model, importance="global", lam=0.5)
    mas.estimate(union())
    mas.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    for x in xs:
        (model(x).pow(2).mean() / WORLD).backward()
    want = mas.add_penalty_grad_()
    assert abs(total - float(want)) <= 1e-5 * float(want)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    assert (tmp / "alone.safetensors").exists()


def test_files_two_ranks_to_one_and_one_to_two(group):
    tmp = passed(group, "files")
    # 2 -> 1: the sharded save is the one-file format (checksums verified by a one-process load)
    model = randomized(mlp())
    one = mk.MAS(model, importance="global", lam=0.7)
    one.load(tmp / "sharded.safetensors")
    close(one.omega, load_result(tmp, "files"), "2 ranks -> 1")
    reference = mk.MAS(randomized(mlp()), importance="global", lam=0.7)
    reference.estimate(union())
    reference.consolidate()
    reference.estimate([b * 0.5 for b in union()])
    reference.consolidate()
    close(one.omega, reference.omega, "sharded file = one process")
    mid = mk.MAS(randomized(mlp()), importance="global")
    mid.load(tmp / "mid.safetensors")
    assert mid.num_samples == sum(map(sum, SIZES))
    mid.consolidate()
    close(mid.omega, expected("global", "per_rank", randomized(mlp())), "mid-task sharded file")
    # 1 -> 2: the one-process file on two ranks, then one more task there
    anchors, omega = load_result(tmp, "loaded")
    model = mlp(seed=1)
    again = mk.MAS(model, importance="global", lam=0.7)
    again.load(tmp / "plain-mid.safetensors")
    again.consolidate()
    again.estimate(union(lambda r: batches(r, seed=300)))
    again.consolidate()
    close(omega, again.omega, "1 process -> 2 ranks")
    for n, t in again.anchors.items():
        assert torch.equal(anchors[n], t)


def test_ddp_options_fingerprint_non_finite_batch_and_timeout(group):
    tmp = passed(group, "ddp_items")
    good = [batches(0)[0], batches(0)[1], batches(1)[0]]
    for rank in range(WORLD):
        close(load_result(tmp, "nonfinite", rank), ref.global_exact(mlp().eval(), good), f"nonfinite rank {rank}")
        close(load_result(tmp, "nonfinite-shards", rank), ref.global_exact(mlp().eval(), [batches(0)[0],
              batches(1)[0]]), f"nonfinite on shards rank {rank}")


# ------------------------------------------------------------- single process
def test_crc32_combine_is_zlibs():
    """The CRC32 of a concatenation from the parts' CRC32s (sharded loads check the file's checksums so)."""
    import zlib

    from hypothesis import given, settings, strategies as st

    from mas_kernels.checkpoint import crc32_combine

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=40))
    def check(a, b, c):
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
        ab = crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
        assert crc32_combine(ab, zlib.crc32(c), len(c)) == zlib.crc32(a + b + c)

    check()


def test_batch_ranks_is_validated():
    with pytest.raises(ValueError, match="batch_ranks='sum' is not one of"):
        mk.MAS(mlp(), importance="global_batch", batch_ranks="sum")
