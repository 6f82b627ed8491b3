"""The wrapper under a demanding user: no silent wrong penalty, no half-applied load, bounded memory,
every bad input named.

Each test states a promise of ``mk.MAS`` and breaks it the way a user would
(swapping parameter storage, copying the wrapper, loading a bad state,
freezing or deleting layers, overflowing the running sum, ...). Expected
values come from the formula written out on the model as it is now
(``explicit_penalty``), never from the code under test.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import stat
import warnings

import pytest
import torch
from torch import nn

import mas_kernels as mk
from mas_kernels import checkpoint
from mas_kernels.state import ImportanceState
from tests import reference as ref

F64 = torch.float64


def mlp(d_in=6, hidden=5, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def trained(importance="global", lam=1.0, **kwargs):
    """A model and its wrapper after one consolidated task, the parameters moved away from theta*."""
    model = mlp()
    mas = mk.MAS(model, lam=lam, importance=importance, **kwargs)
    mas.estimate([torch.randn(8, 6)]).consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, mas


def explicit_penalty(model, mas):
    """``lam * sum Omega (theta - theta*)^2`` over the model's parameters as they are now (float64)."""
    named = dict(model.named_parameters())
    return mas.lam * sum((mas.omega[n].to(F64) * (named[n].detach().to(F64) - mas.anchors[n].to(F64)) ** 2).sum()
                         for n in mas.omega)


def explicit_grads(model, mas):
    named = dict(model.named_parameters())
    return {n: 2 * mas.lam * mas.omega[n].to(F64) * (named[n].detach().to(F64) - mas.anchors[n].to(F64))
            for n in mas.omega}


def assert_penalty_right(model, mas, rtol=1e-5):
    want = explicit_penalty(model, mas)
    assert want > 0
    model.zero_grad(set_to_none=True)
    got = mas.add_penalty_grad_()
    torch.testing.assert_close(got.to(F64), want, rtol=rtol, atol=1e-7)
    for n, g in explicit_grads(model, mas).items():
        p = dict(model.named_parameters())[n]
        tol = rtol if p.dtype == torch.float32 else max(rtol, 1e-2)
        torch.testing.assert_close(p.grad.to(F64), g.to(p.dtype).to(F64), rtol=tol, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(mas.penalty().detach().to(F64), want, rtol=rtol, atol=1e-7)


# ------------------------------------------------ 1. storage swapped after construction
SWAPS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "p.data = t": lambda m: [setattr(p, "data", p.data.clone() + 0.1) for p in m.parameters()],
    "vector_to_parameters": lambda m: nn.utils.vector_to_parameters(
        nn.utils.parameters_to_vector(m.parameters()).clone() - 0.2, m.parameters()),
    "transposed storage": lambda m: setattr(m[0].weight, "data", m[0].weight.data.t().contiguous().t()),
}


@pytest.mark.parametrize("swap", list(SWAPS))
def test_storage_swapped_after_consolidate_the_penalty_follows(backend, swap):
    model, mas = trained()
    SWAPS[swap](model)
    assert_penalty_right(model, mas, rtol=1e-5 if swap not in ("half", "bfloat16") else 1e-2)
    # Training moves the new storage: the penalty sees it (never a stale 0).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert_penalty_right(model, mas, rtol=1e-5 if swap not in ("half", "bfloat16") else 1e-2)
    # consolidate() snapshots the parameters as they are now.
    mas.estimate([torch.randn(4, 6).to(next(model.parameters()).dtype)]).consolidate()
    for n, p in model.named_parameters():
        assert torch.equal(mas.anchors[n].to(p.dtype), p.detach()), n
    assert float(mas.add_penalty_grad_()) == 0.0


def test_channels_last_conv_storage():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    mas = mk.MAS(conv, importance="global")
    mas.estimate([torch.randn(4, 2, 4, 4)]).consolidate()
    conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.2)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_penalty_right(conv, mas)


def test_parameter_resized_in_place_grows_or_warns():
    model, mas = trained()
    old_omega, old_anchor = mas.omega["2.weight"].clone(), mas.anchors["2.weight"].clone()
    # p.data grown (a head gaining a class): kept on the old rows, silently.
    with torch.no_grad():
        model[2].weight.data = torch.cat([model[2].weight.data, torch.randn(1, 5)])
        model[2].bias.data = torch.cat([model[2].bias.data, torch.randn(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = mas.add_penalty_grad_()
    assert torch.equal(mas.omega["2.weight"][:3], old_omega) and mas.omega["2.weight"][3].abs().sum() == 0
    assert torch.equal(mas.anchors["2.weight"][:3], old_anchor)
    torch.testing.assert_close(value.to(F64), explicit_penalty(model, mas))
    # A .grad left with the old shape is named (the kernels would otherwise read past its end).
    model[2].bias.grad = torch.zeros(4)
    model[2].bias.data = torch.cat([model[2].bias.data, torch.randn(1)])
    with pytest.raises(ValueError, match=r"'2.bias' is now \(5,\) but its .grad is still \(4,\).*set_to_none"):
        mas.add_penalty_grad_()
    model.zero_grad(set_to_none=True)
    model[2].weight.data = torch.cat([model[2].weight.data, torch.randn(1, 5)])
    torch.testing.assert_close(mas.add_penalty_grad_().to(F64), explicit_penalty(model, mas))
    # p.data shrunk: its state cannot be kept; a warning names it and says what to do.
    model.zero_grad(set_to_none=True)
    model[0].weight.data = model[0].weight.data[:, :4].clone()
    with pytest.warns(UserWarning, match=r"'0\.weight' changed shape from \(5, 6\) to \(5, 4\).*Restore the shape"):
        mas.penalty()
    assert mas.omega["0.weight"].shape == (5, 4) and mas.omega["0.weight"].abs().sum() == 0


# ------------------------------------------------------------ 2. copies of the wrapper
def _same_state(a, b):
    for part in ("omega", "anchors", "accumulator"):
        sa, sb = a.state_dict()[part], b.state_dict()[part]
        assert set(sa) == set(sb)
        for n in sa:
            assert torch.equal(sa[n], sb[n]), (part, n)
    assert (a.num_samples, a.num_tasks, a.samples_consolidated) == (b.num_samples, b.num_tasks, b.samples_consolidated)


COPIES = {
    "deepcopy": lambda mas: copy.deepcopy(mas),
    "pickle": lambda mas: pickle.loads(pickle.dumps(mas)),
    "torch.save": lambda mas: _torch_round_trip(mas),
}


def _torch_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", list(COPIES))
def test_copied_wrapper_is_correct_and_independent(how):
    model, mas = trained(lam=0.7)
    mas.estimate([torch.randn(3, 6)])  # an open accumulator travels too
    clone = COPIES[how](mas)
    assert clone.module is not model
    _same_state(clone, mas)
    assert clone.lam == 0.7 and clone.importance == "global"
    assert_penalty_right(clone.module, clone)
    # Training the clone's model moves what its penalty sees (not a copy frozen at copy time) ...
    before = {n: t.clone() for n, t in mas.anchors.items()}
    with torch.no_grad():
        for p in clone.module.parameters():
            p.add_(1.0)
    assert_penalty_right(clone.module, clone)
    # ... and its consolidate() snapshots its own model, leaving the original alone.
    clone.consolidate()
    for n, p in clone.module.named_parameters():
        assert torch.equal(clone.anchors[n], p.detach())
        assert torch.equal(mas.anchors[n], before[n])
    assert mas.num_samples == 3 and clone.num_samples == 0


def test_deepcopy_of_model_and_wrapper_together_keeps_the_pair():
    model, mas = trained()
    model2, mas2 = copy.deepcopy((model, mas))
    assert mas2.module is model2
    assert_penalty_right(model2, mas2)
    shallow = copy.copy(mas)  # same model, its own state
    assert shallow.module is model
    shallow.estimate([torch.randn(2, 6)])
    assert shallow.num_samples == 2 and mas.num_samples == 0


def test_copying_refused_while_accumulating_and_with_a_process_group():
    model, mas = trained()
    with mas.accumulating():
        with pytest.raises(RuntimeError, match="accumulating"):
            copy.deepcopy(mas)
    mas.process_group = object()  # stands in for a torch.distributed group
    with pytest.raises(TypeError, match="process_group"):
        pickle.dumps(mas)
    assert copy.deepcopy(mas).process_group is mas.process_group


# ------------------------------------------------ 3. a failed load changes nothing
def _state_and_target():
    model, mas = trained()
    mas.estimate([torch.randn(3, 6)])
    target = mk.MAS(model, importance="global")
    target.estimate([torch.randn(2, 6)])
    return mas.state_dict(), target


def _bad(sd, path, value):
    sd = copy.deepcopy(sd)
    where = sd
    for key in path[:-1]:
        where = where[key]
    if value is KeyError:
        del where[path[-1]]
    else:
        where[path[-1]] = value(where[path[-1]]) if callable(value) else value
    return sd


LOAD_CASES = {
    "num_samples None": (("num_samples",), None, "num_samples"),
    "num_samples str": (("num_samples",), "abc", "num_samples"),
    "num_samples negative": (("num_samples",), -1, "num_samples"),
    "num_samples float": (("num_samples",), 2.5, "num_samples"),
    "num_tasks None": (("num_tasks",), None, "num_tasks"),
    "num_tasks bool": (("num_tasks",), True, "num_tasks"),
    "samples_consolidated missing": (("samples_consolidated",), KeyError, "samples_consolidated"),
    "omega negated": (("omega", "2.bias"), lambda t: -t - 1.0, r"omega\['2.bias'\] has negative"),
    "omega NaN": (("omega", "2.weight"), lambda t: t.index_fill(0, torch.tensor([1]), math.nan),
                  r"omega\['2.weight'\] has non-finite"),
    "omega inf": (("omega", "0.bias"), lambda t: t + math.inf, r"omega\['0.bias'\] has non-finite"),
    "anchor NaN": (("anchors", "2.weight"), lambda t: t * math.nan, r"anchors\['2.weight'\] has non-finite"),
    "accumulator negative": (("accumulator", "0.weight"), lambda t: t - 1.0, r"accumulator\['0.weight'\]"),
    "meta tensor": (("anchors", "2.bias"), lambda t: t.to("meta"), r"anchors\['2.bias'\] is a meta tensor"),
    "int tensor": (("omega", "2.bias"), lambda t: t.int(), r"omega\['2.bias'\] has dtype"),
    "not a tensor": (("omega", "2.bias"), lambda t: t.tolist(), r"omega\['2.bias'\] must be a tensor"),
    "part a list": (("anchors",), lambda d: list(d.values()), "anchors must be a dict"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_bad_state_dict_rejected_before_any_write(case):
    path, value, name = LOAD_CASES[case]
    sd, target = _state_and_target()
    before = target.state_dict()
    bad = _bad(sd, path, value)
    # The last entry of every part is the one broken above only for the parts; break the count
    # last as well: every field is checked before the first write.
    with pytest.raises(ValueError, match=name):
        target.load_state_dict(bad)
    after = target.state_dict()
    for part in ("omega", "anchors", "accumulator"):
        for n in before[part]:
            assert torch.equal(after[part][n], before[part][n]), (part, n)
    assert (after["num_samples"], after["num_tasks"]) == (before["num_samples"], before["num_tasks"])


def test_bad_file_metadata_or_negated_omega_in_a_file_never_loads(tmp_path):
    sd, target = _state_and_target()
    before = target.state_dict()
    tensors = {f"{part}/{n}": t for part in checkpoint.PARTS for n, t in sd[part].items()}
    from safetensors.torch import save_file

    meta = {"format": checkpoint.FORMAT, "num_samples": "abc", "num_batches": 1, "samples_consolidated": 8,
            "num_tasks": 1}
    save_file(tensors, str(tmp_path / "meta.st"), metadata={k: __import__("json").dumps(v) for k, v in meta.items()})
    with pytest.raises(ValueError, match="num_samples='abc'"):
        target.load(tmp_path / "meta.st")
    # A file whose Omega was negated (no checksum: as if written by hand or an old version).
    tensors = dict(tensors, **{"omega/0.weight": -sd["omega"]["0.weight"]})
    meta["num_samples"] = 3
    save_file(tensors, str(tmp_path / "neg.st"), metadata={k: __import__("json").dumps(v) for k, v in meta.items()})
    with pytest.raises(ValueError, match=r"omega\['0.weight'\] has negative"):
        target.load(tmp_path / "neg.st")
    after = target.state_dict()
    for part in checkpoint.PARTS:
        for n in before[part]:
            assert torch.equal(after[part][n], before[part][n])


def test_sharded_penalty_refuses_a_negated_or_nan_omega():
    model, mas = trained()
    sd = mas.state_dict()
    for change, match in [(lambda t: -t - 1.0, "negative"), (lambda t: t * math.nan, "non-finite")]:
        bad = _bad(sd, ("omega", "0.weight"), change)
        with pytest.raises(ValueError, match=rf"ShardedPenalty: omega\['0.weight'\] has {match}"):
            mk.ShardedPenalty(model, bad)
    assert mk.ShardedPenalty(model, sd).penalty() > 0


# ---------------------------------------------- 10. frozen after consolidate, deleted layer
def test_parameter_frozen_after_consolidate_gets_no_penalty_grad_and_does_not_move():
    model, mas = trained()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
    frozen = model[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        value = mas.add_penalty_grad_()
        assert model[0].weight.grad is None
        opt.step()
    assert torch.equal(model[0].weight, frozen)
    named = dict(model.named_parameters())
    want = mas.lam * sum((mas.omega[n].to(F64) * (named[n].detach().to(F64) - mas.anchors[n].to(F64)) ** 2).sum()
                         for n in mas.omega if n != "0.weight")
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(mas.add_penalty_grad_().to(F64), want, rtol=1e-5, atol=1e-7)
    assert value > 0
    # Still tracked (also by a copy): unfrozen later, it has its importance and theta* back.
    assert "0.weight" in mas.omega and mas.omega["0.weight"].abs().sum() > 0
    assert "0.weight" in copy.deepcopy(mas).omega
    model[0].weight.requires_grad_(True)
    assert_penalty_right(model, mas)


def test_deleted_layer_is_noticed_by_penalty_and_files(tmp_path):
    model, mas = trained()
    del model[2]
    assert list(mas.omega) == ["0.weight", "0.bias"]
    assert_penalty_right(model, mas)
    mas.save(tmp_path / "after_delete.st")
    fresh = mk.MAS(model, importance="global")
    fresh.load(tmp_path / "after_delete.st")
    _same_state(fresh, mas)


def test_deleted_layer_noticed_by_the_training_step_alone():
    model, mas = trained()
    head = model[2]  # still referenced: the deletion cannot be seen from garbage collection
    del model[2]
    model.zero_grad(set_to_none=True)
    value = mas.add_penalty_grad_()
    torch.testing.assert_close(value.to(F64), explicit_penalty(model, mas))
    assert head.weight.grad is None


# ---------------------------------------- 11. the float32 running sum overflowing
def _overflowing():
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.full((1, 1), 1.5e19)  # each sample: |y| |x| = 2.25e38, finite; two of them are not
    return model, x


def test_running_sum_overflow_raises_naming_the_layer_and_adds_nothing():
    model, x = _overflowing()
    mas = mk.MAS(model, importance="local")
    mas.estimate([x])
    kept = mas.state_dict()["accumulator"]["0.weight"].clone()
    assert torch.isfinite(kept).all()
    with pytest.raises(FloatingPointError, match="overflows in layer '0'"):
        mas.estimate([x])
    assert mas.num_samples == 1
    assert torch.equal(mas.state_dict()["accumulator"]["0.weight"], kept)
    mas.consolidate()
    assert torch.isfinite(mas.omega["0.weight"]).all()


def test_combining_tasks_past_float32_raises_and_changes_nothing():
    model, x = _overflowing()
    mas = mk.MAS(model, importance="local", combine="sum")
    mas.estimate([x]).consolidate()  # Omega = 2.25e38
    mas.estimate([x])
    with pytest.raises(FloatingPointError, match="Omega of layer '0'.*range.*nothing changed"):
        mas.consolidate()  # 2.25e38 + 2.25e38 does not fit
    assert mas.num_tasks == 1 and mas.num_samples == 1
    torch.testing.assert_close(mas.omega["0.weight"], torch.full((1, 1), 2.25e38))
    torch.testing.assert_close(mas.state_dict()["accumulator"]["0.weight"], torch.full((1, 1), 2.25e38))


# ---------------------------------------------- the deferred finite check (no host sync)
class SyncCounter:
    """Counts the Tensor methods that copy a value to the host (a device synchronization on CUDA).

    Not counted: the Triton launcher's address tables (``ops/triton/_table.py``), which are built
    from host-side integers in CPU tensors on every machine, so reading them never waits on a device.
    """

    NAMES = ("item", "__bool__", "cpu", "tolist", "__float__", "__int__", "__index__", "numpy")
    HOST_SIDE = os.path.join("ops", "triton", "_table.py")

    def __init__(self, monkeypatch):
        import sys

        self.calls = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if not caller.endswith(self.HOST_SIDE):
                    self.calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.fixture
def deferred(monkeypatch):
    """The finite check as it runs on CUDA: on the device, read once per consolidate()."""
    monkeypatch.setattr(ImportanceState, "defer_finite_check", True, raising=False)


def test_local_forward_and_penalty_step_never_sync(backend, deferred, monkeypatch):
    model, mas = trained(importance="local")
    x = torch.randn(16, 6)
    counter = SyncCounter(monkeypatch)
    with torch.no_grad(), mas.accumulating():
        for xb in x.split(4):
            model(xb)
    model(x).sum().backward()
    mas.add_penalty_grad_()
    mas.penalty()
    assert counter.calls == []
    monkeypatch.undo()  # reading the flag is the one synchronization, at consolidate()
    assert mas.num_samples == 16
    mas.consolidate()


def test_deferred_check_rejects_a_bad_batch_at_consolidate(deferred):
    model = mlp()
    mas = mk.MAS(model, importance="local")
    good, bad = torch.randn(4, 6), torch.randn(3, 6)
    bad[1, 2] = math.nan
    with torch.no_grad(), mas.accumulating():
        model(good)
        model(bad)  # no error here: the check runs on the device
        model(good)
    with pytest.raises(FloatingPointError, match="layer '0'"):
        mas.consolidate()
    assert mas.num_samples == 8 and mas.num_tasks == 0
    mas.consolidate()  # reported once; the good batches are folded
    h = model[0](good)
    w0, _ = ref.local_linear(good, h)
    torch.testing.assert_close(mas.omega["0.weight"].to(F64), w0 / 4, rtol=1e-5, atol=1e-6)


def test_deferred_check_catches_the_running_sum_overflow(deferred):
    model, x = _overflowing()
    mas = mk.MAS(model, importance="local")
    mas.estimate([x])
    mas.estimate([x])
    with pytest.raises(FloatingPointError, match="overflow.*layer '0'"):
        mas.check_finite()
    assert mas.num_samples == 1
    mas.consolidate()
    torch.testing.assert_close(mas.omega["0.weight"], torch.full((1, 1), 2.25e38))


# ------------------------------------------------------------------------- memory
def _resnet18_sized():
    """11.7M parameters in 62 tensors of resnet18's sizes (convs as Linear-shaped weights do not matter:
    the state is per element)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    for c_in, c in ((64, 64), (64, 128), (128, 256), (256, 512)):
        for b in range(2):
            i = c_in if b == 0 else c
            shapes += [(c, i, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            if b == 0 and c != i:
                shapes += [(c, i, 1, 1), (c,), (c,)]
    shapes += [(1000, 512), (1000,)]
    model = nn.Module()
    model.ps = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes])
    return model


def holds(mas, bytes_per_element: int, n: int, tensors: int) -> bool:
    """``mas.nbytes`` is ``bytes_per_element * n`` plus at most 16 bytes of alignment padding per view."""
    stores = max(1, bytes_per_element // 2)
    return bytes_per_element * n <= mas.nbytes <= bytes_per_element * n + 16 * tensors * stores


def test_accumulator_lives_only_while_a_task_is_open(tmp_path):
    model = mlp(20, 30, 4)
    n = sum(p.numel() for p in model.parameters())
    k = len(list(model.parameters()))
    mas = mk.MAS(model, importance="local")
    assert holds(mas, 8, n, k)  # Omega + theta*, float32
    mas.estimate([torch.randn(5, 20)])
    assert holds(mas, 16, n, k)  # + accumulator + staging
    # The open accumulator survives state_dict(), save() and load().
    sd = mas.state_dict()
    mas.save(tmp_path / "open.st")
    other = mk.MAS(model, importance="local")
    other.load(tmp_path / "open.st")
    assert other.num_samples == 5
    third = mk.MAS(model, importance="local")
    third.load_state_dict(sd)
    for m in (mas, other, third):
        m.consolidate()
        assert holds(m, 8, n, k)
    torch.testing.assert_close(other.omega["0.weight"], mas.omega["0.weight"])
    torch.testing.assert_close(third.omega["0.weight"], mas.omega["0.weight"])


def test_memory_of_a_resnet18_sized_wrapper():
    model = _resnet18_sized()
    n = sum(p.numel() for p in model.parameters())
    assert 11_000_000 < n < 12_000_000
    k = len(list(model.parameters()))
    full = mk.MAS(model, importance="global_batch")
    small = mk.MAS(model, importance="global_batch", omega_dtype=torch.bfloat16, anchor_dtype=torch.bfloat16)
    assert holds(full, 8, n, k)  # today's main: 16 * n for life
    assert holds(small, 4, n, k)


@pytest.mark.parametrize("omega_dtype,anchor_dtype,bound", [
    (torch.bfloat16, None, 2.0**-9), (torch.float32, torch.bfloat16, None)])
def test_16_bit_state_penalty_accuracy(omega_dtype, anchor_dtype, bound):
    torch.manual_seed(1)
    model = mlp(20, 30, 4)
    x = torch.randn(32, 20)
    exact = mk.MAS(model, importance="global", lam=0.5).estimate([x]).consolidate()
    small = mk.MAS(model, importance="global", lam=0.5, omega_dtype=omega_dtype,
                   anchor_dtype=anchor_dtype).estimate([x]).consolidate()
    assert all(t.dtype == omega_dtype for t in small.omega.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = explicit_penalty(model, exact)
    got = small.penalty().to(F64)
    if bound is not None:  # Omega rounded once (relative 2**-9); every term >= 0
        assert abs(got - want) <= bound * want
    else:  # theta* rounded: the penalty is that of the rounded anchors
        anchors = {n: exact.anchors[n].to(torch.bfloat16) for n in exact.anchors}
        named = dict(model.named_parameters())
        rounded = 0.5 * sum((exact.omega[n].to(F64) * (named[n].detach().to(F64) - anchors[n].to(F64)) ** 2).sum()
                            for n in anchors)
        torch.testing.assert_close(got, rounded, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------- files
def test_save_keeps_the_mode_of_a_file_it_replaces_and_new_files_follow_the_umask(tmp_path):
    _, mas = trained()
    path = tmp_path / "mode.st"
    old = os.umask(0o027)
    try:
        mas.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        os.chmod(path, 0o604)
        mas.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
    finally:
        os.umask(old)


def test_save_writes_through_a_symlink(tmp_path):
    _, mas = trained()
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "state.st"
    link = tmp_path / "link.st"
    link.symlink_to(target)
    mas.save(link)
    assert link.is_symlink() and target.is_file()
    other = mk.MAS(mas.module, importance="global")
    other.load(link)
    _same_state(other, mas)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["state.st"]


def test_save_fsyncs_the_file_before_the_rename_and_the_folder(tmp_path, monkeypatch):
    _, mas = trained()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace",)), real_replace(a, b)))
    mas.save(tmp_path / "sync.st")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_save_failure_leaves_no_temp_file_and_the_target_untouched(tmp_path, monkeypatch):
    _, mas = trained()
    path = tmp_path / "keep.st"
    path.write_bytes(b"old contents")
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="MAS.save: writing .*keep.st.* failed"):
        mas.save(path)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.st"]


def test_save_errors_name_the_users_path(tmp_path, monkeypatch):
    _, mas = trained()
    with pytest.raises(FileNotFoundError, match="folder .*missing.* does not exist; create it first"):
        mas.save(tmp_path / "missing" / "x.st")
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # a read-only folder (this suite may run as root)
    with pytest.raises(PermissionError, match=r"cannot create a file in the folder .*ro.st"):
        mas.save(tmp_path / "ro.st")
    with pytest.raises(TypeError, match=r"path must be a str or a pathlib.Path, got bytes.*decode"):
        mas.save(b"state.st")
    with pytest.raises(TypeError, match="got bytes"):
        mas.load(b"state.st")
    with pytest.raises(FileNotFoundError, match="MAS.load: no such file"):
        mas.load(tmp_path / "nothing.st")


def test_checksum_verified_on_load_and_old_files_still_load(tmp_path):
    _, mas = trained()
    path = tmp_path / "sum.st"
    mas.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data
    (tmp_path / "flipped.st").write_bytes(bytes(data))
    other = mk.MAS(mas.module, importance="global")
    with pytest.raises(ValueError, match="checksum"):
        other.load(tmp_path / "flipped.st")
    assert other.num_tasks == 0
    # A file without checksums (written before they existed) loads.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != "checksums"}
    save_file(tensors, str(tmp_path / "old.st"), metadata=meta)
    other.load(tmp_path / "old.st")
    _same_state(other, mas)


# ------------------------------------------------------------------------ messages
@pytest.mark.parametrize("kwargs,match", [
    (dict(lam="abc"), "lam must be a number"),
    (dict(lam=-1.0), r"lam=-1.0 must be a finite number >= 0"),
    (dict(lam=math.nan), "lam=nan must be a finite number >= 0"),
    (dict(lam=True), "lam must be a number"),
    (dict(combine="0.5"), "pass the number 0.5, not a string"),
    (dict(combine=True), "combine=True must be"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive number"),
    (dict(chunk_size=-3), "chunk_size=-3 must be a positive number"),
    (dict(omega_dtype=torch.int32), "omega_dtype"),
    (dict(omega_dtype=torch.float16), "omega_dtype.*65504"),
    (dict(params=["0.weight", "nope", "2.bais"]), r"params= names \['nope', '2.bais'\]"),
    (dict(params="0.weight"), "params= must be a callable"),
])
def test_constructor_messages_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.MAS(mlp(), **kwargs)


def test_lam_setter_validates():
    _, mas = trained()
    for bad in ("abc", -0.5, math.inf):
        with pytest.raises(ValueError, match="lam"):
            mas.lam = bad
    mas.lam = 2.0
    assert mas.lam == 2.0


def test_output_fn_returning_a_list_is_named():
    model = mlp()
    mas = mk.MAS(model, importance="global", output_fn=lambda out: [out])
    with pytest.raises(TypeError, match="output_fn returned a list; it must return one tensor"):
        mas.estimate([torch.randn(3, 6)])


# ---------------------------------------------- issue 15: growing parameters, a filter
def test_grown_head_keeps_old_entries_and_starts_new_ones_at_zero():
    model, mas = trained()
    old_w, old_b = mas.omega["2.weight"].clone(), mas.omega["2.bias"].clone()
    old_aw = mas.anchors["2.weight"].clone()
    bigger = nn.Linear(5, 5)
    with torch.no_grad():
        bigger.weight[:3] = model[2].weight
        bigger.bias[:3] = model[2].bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model[2] = bigger  # same name, two more classes
        omega = mas.omega
    assert torch.equal(omega["2.weight"][:3], old_w) and torch.equal(omega["2.bias"][:3], old_b)
    assert omega["2.weight"][3:].abs().sum() == 0 and omega["2.bias"][3:].abs().sum() == 0
    assert torch.equal(mas.anchors["2.weight"][:3], old_aw)
    assert_penalty_right(model, mas)
    # The next task's importance covers the new rows too.
    mas.estimate([torch.randn(4, 6)]).consolidate()
    assert mas.omega["2.weight"][3:].abs().sum() > 0


def test_params_filter_tracks_the_backbone_only():
    model = mlp()
    x = torch.randn(7, 6)
    backbone = mk.MAS(model, importance="global", params=lambda name, p: not name.startswith("2."))
    named = mk.MAS(model, importance="global", params=["0.weight", "0.bias"])
    for mas in (backbone, named):
        assert mas.tracked == ["0.weight", "0.bias"]
        mas.estimate([x]).consolidate()
        expected = ref.global_exact(model, [x])
        for n in ("0.weight", "0.bias"):
            torch.testing.assert_close(mas.omega[n].to(F64), expected[n].to(F64), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model[2].weight.add_(1.0)  # the head is free: no penalty for it
    model.zero_grad(set_to_none=True)
    assert float(backbone.add_penalty_grad_()) == 0.0 and model[2].weight.grad is None
    # A frozen parameter named explicitly needs include_frozen.
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.bias'\], which have requires_grad=False.*include_frozen=True"):
        mk.MAS(model, params=["0.bias"])
    assert mk.MAS(model, params=["0.bias"], include_frozen=True).tracked == ["0.bias"]
