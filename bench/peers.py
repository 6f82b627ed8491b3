"""The per-sample peers of the exact rule: Opacus, BackPACK and torch.func, each computing ``sum_k |g_k|``.

Each peer is the library's documented way to get per-sample gradients, the
abs and the sum over samples added: Opacus' ``GradSampleModule`` (``p.grad_sample``,
``loss_reduction="sum"``), BackPACK's ``BatchGrad`` (``p.grad_batch``) and
``torch.func.vmap(grad(...))`` over ``functional_call`` (one sample per call, as a
batch of one). The loss is the exact rule's, ``sum_k ||F(x_k)||^2``.

A peer that is not installed, or raises on the model, is not timed; its row
in the notes says why. Every peer that runs is checked against a float64
oracle (one backward pass per sample on a float64 copy of the model, the
paper's formula literally); a peer whose result differs (beyond float32
rounding, or that leaves parameters without a gradient) is reported as wrong,
with the parameters it got wrong, and not timed as if it were right.
Optional extras: ``pip install opacus``; ``pip install --no-deps
backpack-for-pytorch einops unfoldNd`` (BackPACK pins an old torch).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Callable

import torch
from torch import nn

PEERS = ("opacus", "backpack", "torch.func")
_MODULES = {"opacus": "opacus", "backpack": "backpack", "torch.func": "torch.func"}


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[name]) is not None
    except ModuleNotFoundError:
        return False


def _call(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _sample(batch, k: int):
    if isinstance(batch, dict):
        return {key: v[k:k + 1] for key, v in batch.items()}
    return batch[k:k + 1]


def _n(batch) -> int:
    return next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0]


def oracle(model: nn.Module, batch, output_fn: Callable) -> dict[str, torch.Tensor]:
    """``sum_k |d ||F(x_k)||^2 / d theta|`` in float64, one sample per backward pass."""
    m = copy.deepcopy(model).double().eval()
    params = dict(m.named_parameters())
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    for k in range(_n(batch)):
        x = _sample(batch, k)
        if not isinstance(x, dict) and x.is_floating_point():
            x = x.double()
        loss = output_fn(_call(m, x)).double().pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                out[name] += g.abs()
    return out


def _opacus(model: nn.Module, batch, output_fn: Callable):
    from opacus import GradSampleModule

    m = copy.deepcopy(model).eval()
    # Opacus records activations only in train mode: the layers with parameters (Linear, Conv, norms but
    # BatchNorm, embeddings) train, the rest (dropout, HF attention) stays in eval mode, so the function is the
    # exact rule's.
    for sub in m.modules():
        if any(True for _ in sub.parameters(recurse=False)) and not isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.train()
    gsm = GradSampleModule(m, loss_reduction="sum")
    params = dict(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad_sample = None
        output_fn(_call(gsm, batch)).pow(2).sum().backward()
        return {name: p.grad_sample.abs().sum(0) for name, p in params.items() if p.grad_sample is not None}

    return run


def _backpack(model: nn.Module, batch, output_fn: Callable):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    m = extend(copy.deepcopy(model).eval(), use_converter=True)
    params = dict(m.named_parameters())

    def run():
        m.zero_grad(set_to_none=True)
        loss = output_fn(_call(m, batch)).pow(2).sum()
        with backpack(BatchGrad()):
            loss.backward()
        return {name: p.grad_batch.abs().sum(0) for name, p in params.items()
                if getattr(p, "grad_batch", None) is not None}

    return run


def _torch_func(model: nn.Module, batch, output_fn: Callable):
    from torch.func import functional_call, grad, vmap

    m = copy.deepcopy(model).eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}

    def loss(p, x):
        x1 = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        return output_fn(_call_functional(p, x1)).pow(2).sum()

    def _call_functional(p, x1):
        args = ((), x1) if isinstance(x1, dict) else ((x1,), {})
        return functional_call(m, (p, buffers), args[0], args[1])

    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="same")

    def run():
        g = per_sample(params, batch)
        return {name: t.abs().sum(0) for name, t in g.items()}

    return run


_BUILD = {"opacus": _opacus, "backpack": _backpack, "torch.func": _torch_func}


def check(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-2) -> list[str]:
    """The parameters where ``got`` is missing or differs from ``expected`` by more than ``rtol`` of the
    parameter's own scale, floored at 1e-3 of the model's largest importance: a parameter whose true importance
    is ~0 (BERT's token-type row, flattened by the LayerNorm after it: 1e-9 of the model's scale) holds float32
    round-off in any float32 computation, the per-sample loop's included."""
    top = max(e.abs().max().item() for e in expected.values()) or 1.0
    wrong = []
    for name, e in expected.items():
        g = got.get(name)
        if g is None:
            if e.abs().max().item() > 1e-3 * top:
                wrong.append(f"{name} (missing)")
            continue
        scale = max(e.abs().max().item(), 1e-3 * top)
        if (g.double() - e).abs().max().item() > rtol * scale:
            wrong.append(name)
    return wrong


def build(name: str, model: nn.Module, batch, output_fn: Callable, expected: dict[str, torch.Tensor]):
    """``(fn, None)`` with ``fn()`` running the peer once, or ``(None, why)`` when it is not installed, raises,
    or is wrong against ``expected`` (the float64 oracle)."""
    if not installed(name):
        return None, "not installed"
    try:
        fn = _BUILD[name](model, batch, output_fn)
        got = fn()
    except Exception as exc:  # noqa: BLE001 - the bench records why the peer does not run
        return None, f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    wrong = check(got, expected)
    if wrong:
        return None, f"WRONG on {len(wrong)}/{len(expected)} tensors (e.g. {', '.join(wrong[:3])})"
    return fn, None
