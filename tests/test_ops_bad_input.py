"""Bad input: a ``ValueError`` naming the argument (and list index) at fault, and nothing written.

Each case breaks one argument, for lists always the *last* entry, so an op that
validated and wrote tensor by tensor would already have written the first ones
when it noticed. ``meta`` tensors stand in for "another device" on a machine
without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mas_kernels as mk
from tests.helpers import BF16, F16, F32, assert_names, assert_unchanged, snapshot

META = torch.device("meta")
C64 = torch.complex64  # float64 is supported (tests/test_ops_float64.py); complex is not


# ------------------------------------------------------- abs_outer_accumulate_
def _outer_args():
    return {"omega": torch.rand(4, 3), "a": torch.randn(5, 4), "b": torch.randn(5, 3), "alpha": 0.5}


OUTER_CASES = {
    # case: (changes to the good arguments, the name the message must contain)
    "omega shape": ({"omega": torch.rand(4, 4)}, "omega"),
    "omega shape transposed": ({"omega": torch.rand(3, 4)}, "omega"),
    "omega 1-D": ({"omega": torch.rand(12)}, "omega"),
    "a rows": ({"a": torch.randn(6, 4)}, "a"),
    "b rows": ({"b": torch.randn(4, 3)}, "b"),
    "a 3-D": ({"a": torch.randn(5, 4, 1)}, "a"),
    "b 1-D": ({"b": torch.randn(5)}, "b"),
    "omega fp16": ({"omega": torch.rand(4, 3, dtype=F16)}, "omega"),
    "omega bf16": ({"omega": torch.rand(4, 3, dtype=BF16)}, "omega"),
    "omega complex": ({"omega": torch.rand(4, 3, dtype=C64)}, "omega"),
    "omega int": ({"omega": torch.zeros(4, 3, dtype=torch.int32)}, "omega"),
    "a complex": ({"a": torch.randn(5, 4, dtype=C64)}, "a"),
    "a int": ({"a": torch.ones(5, 4, dtype=torch.int64)}, "a"),
    "b bool": ({"b": torch.ones(5, 3, dtype=torch.bool)}, "b"),
    "b complex": ({"b": torch.randn(5, 3, dtype=C64)}, "b"),
    "a device": ({"a": torch.randn(5, 4, device=META)}, "a"),
    "b device": ({"b": torch.randn(5, 3, device=META)}, "b"),
    "omega device": ({"omega": torch.rand(4, 3, device=META)}, "omega"),
    "a list": ({"a": [[1.0] * 4] * 5}, "a"),
    "b numpy": ({"b": torch.randn(5, 3).numpy()}, "b"),
    "omega None": ({"omega": None}, "omega"),
    "alpha str": ({"alpha": "x"}, "alpha"),
    "alpha None": ({"alpha": None}, "alpha"),
    "alpha vector": ({"alpha": torch.ones(2)}, "alpha"),
}


@pytest.mark.parametrize("case", list(OUTER_CASES))
def test_abs_outer_bad_input(backend, case):
    changes, name = OUTER_CASES[case]
    args = _outer_args() | changes
    omega = args["omega"]
    before = snapshot([omega]) if isinstance(omega, torch.Tensor) else None
    with pytest.raises(ValueError) as exc:
        mk.abs_outer_accumulate_(args["omega"], args["a"], args["b"], args["alpha"])
    assert_names(exc, name)
    if before is not None:
        assert_unchanged([omega], before, "omega")


# ------------------------------------------------------------- abs_accumulate_
def _acc_args():
    shapes = [(3, 2), (5,), (2, 2)]
    return {
        "omegas": [torch.rand(s) for s in shapes],
        "tensors": [torch.randn(s, dtype=d) for s, d in zip(shapes, (F32, F16, BF16))],
        "alpha": 1.0,
    }


def _set(lst_name, index, value):
    def change(args):
        args[lst_name][index] = value
    return change


def _replace(name, value):
    def change(args):
        args[name] = value(args) if callable(value) else value
    return change


def _both_meta(names, index):
    def change(args):
        for n in names:
            args[n][index] = args[n][index].to(META)
    return change


ACC_CASES = {
    "omegas[2] fp16": (_set("omegas", 2, torch.rand(2, 2, dtype=F16)), "omegas[2]"),
    "omegas[2] complex": (_set("omegas", 2, torch.rand(2, 2, dtype=C64)), "omegas[2]"),
    "omegas[2] int": (_set("omegas", 2, torch.zeros(2, 2, dtype=torch.int64)), "omegas[2]"),
    "tensors[2] int": (_set("tensors", 2, torch.ones(2, 2, dtype=torch.int32)), "tensors[2]"),
    "tensors[2] complex": (_set("tensors", 2, torch.randn(2, 2, dtype=C64)), "tensors[2]"),
    "tensors[2] shape": (_set("tensors", 2, torch.randn(2, 3)), "tensors[2]"),
    "tensors[2] transposed shape": (_set("tensors", 2, torch.randn(4, 1)), "tensors[2]"),
    "omegas[2] shape": (_set("omegas", 2, torch.rand(4)), "omegas[2]"),
    "tensors[2] device": (_set("tensors", 2, torch.randn(2, 2, device=META)), "tensors[2]"),
    "omegas[2] device": (_both_meta(["omegas", "tensors"], 2), "omegas[2]"),
    "tensors[2] float": (_set("tensors", 2, 3.0), "tensors[2]"),
    "omegas[2] None": (_set("omegas", 2, None), "omegas[2]"),
    "tensors shorter": (_replace("tensors", lambda a: a["tensors"][:2]), "tensors"),
    "tensors longer": (_replace("tensors", lambda a: a["tensors"] + [torch.randn(1)]), "tensors"),
    "omegas a tensor": (_replace("omegas", torch.rand(3, 2)), "omegas"),
    "tensors a tensor": (_replace("tensors", torch.rand(3, 2)), "tensors"),
    "tensors None": (_replace("tensors", None), "tensors"),
    "alpha str": (_replace("alpha", "1.0x"), "alpha"),
}


@pytest.mark.parametrize("case", list(ACC_CASES))
def test_abs_accumulate_bad_input(backend, case):
    change, name = ACC_CASES[case]
    args = _acc_args()
    good_omegas = list(args["omegas"])
    before = snapshot(good_omegas)
    change(args)
    with pytest.raises(ValueError) as exc:
        mk.abs_accumulate_(args["omegas"], args["tensors"], args["alpha"])
    assert_names(exc, name)
    assert_unchanged(good_omegas, before, "omegas")


# ---------------------------------------------------- penalty_grad_ and penalty
def _pen_args():
    shapes = [(3, 2), (5,), (2, 2)]
    return {
        "params": [torch.randn(s, dtype=d) for s, d in zip(shapes, (F32, BF16, F16))],
        "anchors": [torch.randn(s) for s in shapes],
        "omegas": [torch.rand(s) for s in shapes],
        "grads": [torch.randn(s, dtype=d) for s, d in zip(shapes, (F32, F32, F16))],
        "lam": 0.5,
    }


PEN_CASES = {
    "params[2] int": (_set("params", 2, torch.ones(2, 2, dtype=torch.int64)), "params[2]"),
    "params[2] complex": (_set("params", 2, torch.randn(2, 2, dtype=C64)), "params[2]"),
    "params[2] float": (_set("params", 2, 1.5), "params[2]"),
    "anchors[2] complex": (_set("anchors", 2, torch.randn(2, 2, dtype=C64)), "anchors[2]"),
    "anchors[2] int": (_set("anchors", 2, torch.ones(2, 2, dtype=torch.int8)), "anchors[2]"),
    "anchors[2] shape": (_set("anchors", 2, torch.randn(4)), "anchors[2]"),
    "anchors[2] device": (_set("anchors", 2, torch.randn(2, 2, device=META)), "anchors[2]"),
    "anchors[2] None": (_set("anchors", 2, None), "anchors[2]"),
    # (16-bit Omega is accepted by the penalty ops: MAS(omega_dtype=torch.bfloat16).)
    "omegas[2] complex": (_set("omegas", 2, torch.rand(2, 2, dtype=C64)), "omegas[2]"),
    "omegas[2] int": (_set("omegas", 2, torch.ones(2, 2, dtype=torch.int32)), "omegas[2]"),
    "omegas[2] shape": (_set("omegas", 2, torch.rand(2, 1)), "omegas[2]"),
    "omegas[2] device": (_set("omegas", 2, torch.rand(2, 2, device=META)), "omegas[2]"),
    "params[2] device": (_both_meta(["params", "anchors", "omegas", "grads"], 2), "params[2]"),
    "anchors shorter": (_replace("anchors", lambda a: a["anchors"][:2]), "anchors"),
    "omegas longer": (_replace("omegas", lambda a: a["omegas"] + [torch.rand(1)]), "omegas"),
    "params a tensor": (_replace("params", torch.randn(3, 2)), "params"),
    "anchors a dict": (_replace("anchors", lambda a: dict(enumerate(a["anchors"]))), "anchors"),
    "lam str": (_replace("lam", "big"), "lam"),
    "lam None": (_replace("lam", None), "lam"),
    "lam vector": (_replace("lam", torch.ones(3)), "lam"),
}
# Only meaningful when grads are given.
GRAD_CASES = {
    "grads[2] shape": (_set("grads", 2, torch.randn(2, 3)), "grads[2]"),
    "grads[2] int": (_set("grads", 2, torch.zeros(2, 2, dtype=torch.int32)), "grads[2]"),
    "grads[2] complex": (_set("grads", 2, torch.zeros(2, 2, dtype=C64)), "grads[2]"),
    "grads[2] device": (_set("grads", 2, torch.zeros(2, 2, device=META)), "grads[2]"),
    "grads[2] float": (_set("grads", 2, 0.0), "grads[2]"),
    "grads shorter": (_replace("grads", lambda a: a["grads"][:2]), "grads"),
    "grads a tensor": (_replace("grads", torch.zeros(3, 2)), "grads"),
}


@pytest.mark.parametrize("case", list(PEN_CASES) + list(GRAD_CASES))
def test_penalty_grad_bad_input(backend, case):
    change, name = (PEN_CASES | GRAD_CASES)[case]
    args = _pen_args()
    good_grads = list(args["grads"])
    before = snapshot(good_grads)
    change(args)
    with pytest.raises(ValueError) as exc:
        mk.penalty_grad_(args["params"], args["anchors"], args["omegas"], args["lam"], args["grads"])
    assert_names(exc, name)
    assert_unchanged(good_grads, before, "grads")


@pytest.mark.parametrize("case", list(PEN_CASES))
def test_penalty_grad_into_dot_grad_bad_input(backend, case):
    # grads=None: p.grad must stay None (not allocated) and existing p.grad unchanged.
    change, name = PEN_CASES[case]
    args = _pen_args()
    params = list(args["params"])
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = None
    params[2].grad = torch.randn_like(params[2])
    before = snapshot([p.grad for p in params])
    change(args)
    with pytest.raises(ValueError) as exc:
        mk.penalty_grad_(args["params"], args["anchors"], args["omegas"], args["lam"])
    assert_names(exc, name)
    assert_unchanged([p.grad for p in params], before, "params[i].grad")


@pytest.mark.parametrize("case", list(PEN_CASES))
def test_penalty_bad_input(backend, case):
    change, name = PEN_CASES[case]
    args = _pen_args()
    args["params"] = [p.requires_grad_() for p in args["params"]]
    change(args)
    with pytest.raises(ValueError) as exc:
        mk.penalty(args["params"], args["anchors"], args["omegas"], args["lam"])
    assert_names(exc, name)


def test_bad_input_names_the_right_index(backend):
    # The culprit in the middle of a longer list: the message names it, not a neighbour.
    params = [torch.randn(3) for _ in range(25)]
    anchors = [torch.randn(3) for _ in range(25)]
    omegas = [torch.rand(3) for _ in range(25)]
    omegas[21] = torch.rand(4)
    grads = [torch.zeros(3) for _ in range(25)]
    with pytest.raises(ValueError) as exc:
        mk.penalty_grad_(params, anchors, omegas, 1.0, grads)
    assert_names(exc, "omegas[21]")
    assert all(g.count_nonzero() == 0 for g in grads)
    tensors = [torch.randn(3) for _ in range(25)]
    tensors[12] = tensors[12].to(torch.int32)
    with pytest.raises(ValueError) as exc:
        mk.abs_accumulate_([o[:3] for o in omegas], tensors)
    assert_names(exc, "tensors[12]")


def test_good_input_after_bad_input_still_works(backend):
    # A failed call leaves no state behind (e.g. a half-built table or grads list).
    p = [torch.randn(4, requires_grad=True)]
    with pytest.raises(ValueError):
        mk.penalty_grad_(p, [torch.randn(5)], [torch.rand(4)], 1.0)
    assert p[0].grad is None
    a = torch.randn(4)
    out = mk.penalty_grad_(p, [a], [torch.ones(4)], 1.0)
    torch.testing.assert_close(out, ((p[0] - a) ** 2).sum().detach())
    torch.testing.assert_close(p[0].grad, 2 * (p[0] - a).detach())
