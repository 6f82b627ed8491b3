"""The cases: for each op and size, its inputs (built once) and its implementations side by side.

A case is a function returning a :class:`bench.harness.Case`; :func:`plan` lists
the ones the CLI runs, in order, each under a section name (``--only``). To add
one: write the ``*_case`` function, then append ``(section, builder)`` to
``plan`` (a new section name goes into ``SECTIONS`` too).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import mas_kernels as mk
from mas_kernels.ops.abs_accumulate import abs_accumulate_torch
from mas_kernels.ops.penalty import penalty_grad_torch

from .harness import Case, ours_backend, peak_memory, sync
from .models import KINDS, build

LAM = 1e-3  # small, so grads that accumulate over hundreds of timed calls stay finite in bf16
SECTIONS = ("penalty", "abs_accumulate", "abs_outer", "conv", "conv_exact", "optim", "e2e", "importance",
            "selfcheck", "integrations")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_path(fn: Callable) -> Callable:
    """``fn`` (an op's PyTorch implementation) as the ops' Python kernels run it: under ``no_grad``."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


# ----------------------------------------------------------------- parameter lists
def resnet50_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 elements at width 1).

    ``width`` scales every channel count (the 1000 classes stay), for smaller
    lists with the same structure.
    """
    def c(ch: int) -> int:
        return max(1, int(round(ch * width)))

    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    inplanes = c(64)
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        p, out = c(planes), c(planes * 4)
        for b in range(blocks):
            shapes += [(p, inplanes, 1, 1), (p,), (p,), (p, p, 3, 3), (p,), (p,), (out, p, 1, 1), (out,), (out,)]
            if b == 0:  # the downsampling projection
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, inplanes), (1000,)]
    return shapes


def transformer_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """The 199 parameter shapes of a BERT-base-like encoder (109,482,240 elements at width 1).

    12 layers, hidden 768, FFN 3072, 30,522-word vocabulary, 512 positions,
    and a pooler. ``width`` scales the hidden and FFN sizes (the vocabulary
    and positions stay), for smaller lists with the same structure.
    """
    d, f = max(1, int(round(768 * width))), max(1, int(round(3072 * width)))
    shapes = [(30522, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(12):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (f, d), (f,), (d, f), (d,), (d,), (d,)]
    shapes += [(d, d), (d,)]
    return shapes


PARAM_LISTS = {"resnet50": resnet50_shapes, "transformer": transformer_shapes}


# ----------------------------------------------------------------- ops
def _views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, off = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(flat[off:off + k].view(s))
        off += k
    return out


def _copy_bound(n_bytes: int, device: torch.device) -> Callable:
    """A copy that reads n_bytes/2 and writes n_bytes/2: the memory traffic of an n_bytes op."""
    half = max(1, n_bytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _compiled(fn: Callable, notes: dict, key: str):
    """torch.compile(fn), or None with the reason in ``notes``."""
    try:
        return torch.compile(fn, dynamic=True)
    except Exception as exc:  # noqa: BLE001 - the bench records why and goes on
        notes[key] = f"torch.compile unavailable: {type(exc).__name__}: {exc}"
        return None


_PENALTY_COMPILED: dict = {}


def _penalty_flat(p, a, o, g, lam: float):
    """The penalty and its gradient on flat buffers, as a user would write it for torch.compile."""
    d = p.float() - a.float()
    od = o * d
    g.add_(od, alpha=2.0 * lam)
    return lam * (od * d).sum()


def penalty_case(width: float, dtype: torch.dtype, device: torch.device, use_compile: bool,
                 quick: bool, model: str = "resnet50") -> Case:
    """penalty+grad over the ``model``-like list (see ``PARAM_LISTS``) at ``width``; params, anchors, grads in ``dtype``."""
    shapes = PARAM_LISTS[model](width)
    n = sum(math.prod(s) for s in shapes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    p_flat = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    a_flat = (p_flat.float() + 0.01 * torch.randn(n, generator=gen).to(device)).to(dtype)
    o_flat = torch.rand(n, generator=gen).to(device)
    g_flat = (1e-3 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)
    params = [nn.Parameter(v) for v in _views(p_flat, shapes)]
    grads = _views(g_flat, shapes)
    for p, g in zip(params, grads):
        p.grad = g
    anchors, omegas = _views(a_flat, shapes), _views(o_flat, shapes)
    lam = LAM

    def avalanche():
        # Avalanche's MAS plugin: a loss term per parameter, autograd for the gradient.
        loss = 0.0
        for p, a, o in zip(params, anchors, omegas):
            loss = loss + (o * (p - a).pow(2)).sum()
        loss = lam * loss
        loss.backward()
        return loss

    def foreach():
        with torch.no_grad():
            d = torch._foreach_sub(params, anchors)
            od = torch._foreach_mul(omegas, d)
            torch._foreach_add_(grads, od, alpha=2.0 * lam)
            torch._foreach_mul_(od, d)
            # od * d = Omega d^2 >= 0, so its L1 norm is its sum: one foreach kernel, no Python loop.
            return lam * torch.stack(torch._foreach_norm(od, 1)).sum()

    def ours():
        return mk.penalty_grad_(params, anchors, omegas, lam, grads)

    detached = [p.detach() for p in params]

    def ours_op():
        # What mk.MAS runs every step: the registered op on lists it validated once.
        return torch.ops.mas_kernels.penalty_grad_(detached, anchors, omegas, lam, grads)

    def ours_flat():
        return mk.penalty_grad_([p_flat], [a_flat], [o_flat], lam, [g_flat])

    bpe = 2 * dtype.itemsize + 4 + 2 * dtype.itemsize  # read p, anchor, Omega, grad; write grad
    impls = {"avalanche loop": avalanche, "foreach": foreach, "ours": ours, "ours, torch.ops (as mk.MAS)": ours_op,
             "ours, 1 flat tensor": ours_flat}
    if ours_backend(device) != "torch":
        impls["ours, torch path"] = lambda: torch_path(penalty_grad_torch)(params, anchors, omegas, lam, grads)
    notes = {}
    if use_compile:
        key = (str(dtype), str(device))
        if key not in _PENALTY_COMPILED:
            _PENALTY_COMPILED[key] = _compiled(_penalty_flat, notes, "compile")
        fn = _PENALTY_COMPILED[key]
        if fn is not None:
            def compiled():
                return fn(p_flat, a_flat, o_flat, g_flat, lam)

            t0 = time.perf_counter()
            try:
                compiled()
                sync(device)
                impls["torch.compile, flat"] = compiled
                first = time.perf_counter() - t0
                if first > 0.5:  # compiled here (once per dtype: dynamic shapes serve the other sizes)
                    notes["compile_s"] = round(first, 1)
            except Exception as exc:  # noqa: BLE001
                notes["compile"] = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}"
    else:
        notes["compile"] = "skipped under --quick (compiling takes seconds)" if quick else "skipped (--no-compile)"
    impls["copy bound"] = _copy_bound(n * bpe, device)
    return Case("penalty_grad", _dtype_name(dtype), f"{model} x{width:g} ({len(shapes)} tensors, {n / 1e6:.2f}M)",
                n, "bytes", n * bpe, impls, bound="copy bound", baseline="avalanche loop", notes=notes)


def abs_accumulate_case(width: float, dtype: torch.dtype, device: torch.device) -> Case:
    """abs_accumulate_ over the ResNet-50-like list: Omega_i += alpha |t_i| (t in ``dtype``)."""
    shapes = resnet50_shapes(width)
    n = sum(math.prod(s) for s in shapes)
    t_flat = torch.randn(n, device=device).to(dtype)
    o_flat = torch.zeros(n, device=device)
    tensors, omegas = _views(t_flat, shapes), _views(o_flat, shapes)
    alpha = 1e-3

    def foreach():
        torch._foreach_add_(omegas, torch._foreach_abs(tensors), alpha=alpha)

    def ours():
        mk.abs_accumulate_(omegas, tensors, alpha)

    impls = {"torch loop": lambda: torch_path(abs_accumulate_torch)(omegas, tensors, alpha), "foreach": foreach,
             "ours": ours}
    bpe = dtype.itemsize + 8  # read t, read Omega, write Omega
    impls["copy bound"] = _copy_bound(n * bpe, device)
    return Case("abs_accumulate", _dtype_name(dtype), f"resnet50 x{width:g} ({len(shapes)} tensors, {n / 1e6:.2f}M)",
                n, "bytes", n * bpe, impls, bound="copy bound", baseline="torch loop")


def abs_outer_case(n: int, j: int, i: int, dtype: torch.dtype, device: torch.device) -> Case:
    """Linear importance: omega (J, I) += alpha |a|^T |b| with a (N, J), b (N, I) in ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, j, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, i, generator=gen).to(device=device, dtype=dtype)
    omega = torch.zeros(j, i, device=device)
    out = torch.empty(j, i, device=device, dtype=dtype)
    alpha = 1.0 / n

    def addmm_abs():
        omega.addmm_(a.abs().T.float(), b.abs().float(), alpha=alpha)

    def loop():
        for k in range(n):
            omega.add_(torch.outer(a[k].abs().float(), b[k].abs().float()), alpha=alpha)

    def ours():
        mk.abs_outer_accumulate_(omega, a, b, alpha)

    def matmul():
        torch.mm(a.T, b, out=out)

    impls = {"addmm_(|a|^T,|b|)": addmm_abs, "ours": ours}
    if n * j * i <= 2**26:  # the per-sample loop is for small sizes only
        impls["per-sample loop"] = loop
    impls["matmul bound"] = matmul
    return Case("abs_outer", _dtype_name(dtype), f"N={n} {j}x{i}", n * j * i, "flops", 2.0 * n * j * i, impls,
                bound="matmul bound", baseline="addmm_(|a|^T,|b|)")


def conv_case(n: int, c: int, o: int, hw: int, dtype: torch.dtype, device: torch.device) -> Case:
    """Conv2d (3x3, padding 1) local importance: sum over samples and positions of |y| |x|^T."""
    x = torch.randn(n, c, hw, hw, device=device).to(dtype)
    w = torch.randn(o, c, 3, 3, device=device).to(dtype)
    y = F.conv2d(x, w, padding=1)
    omega = torch.zeros(o, c, 3, 3, device=device)

    def weight_grad_abs():
        omega.add_(torch.nn.grad.conv2d_weight(x.abs().float(), w.shape, y.abs().float(), padding=1))

    def unfold_einsum():
        cols = F.unfold(x.abs().float(), 3, padding=1)  # (N, C*9, L)
        omega.add_(torch.einsum("nol,nkl->ok", y.abs().float().flatten(2), cols).view_as(omega))

    def plain():
        torch.nn.grad.conv2d_weight(x, w.shape, y, padding=1)

    flops = 2.0 * n * o * c * 9 * hw * hw
    impls = {"unfold+einsum": unfold_einsum, "conv2d_weight(|x|,|y|)": weight_grad_abs, "plain weight-grad bound": plain}
    return Case("conv_importance", _dtype_name(dtype), f"N={n} {c}->{o} {hw}x{hw} k3", n * o * c * 9 * hw * hw,
                "flops", flops, impls, bound="plain weight-grad bound", baseline="unfold+einsum")


# ----------------------------------------------------------------- optimizer step
class _ParamList(nn.Module):
    """Parameters of given shapes (views of one flat buffer), as a module a wrapper can track."""

    def __init__(self, flat: torch.Tensor, shapes):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(v) for v in _views(flat, shapes)])


def optim_case(model: str, device: torch.device, width: float = 1.0) -> Case:
    """One AdamW step over the ``model``-like list (``PARAM_LISTS``), fp32, with and without the MAS penalty.

    Rows: torch's ``AdamW(fused=True)`` alone (the baseline); ``mas.add_penalty_grad_()`` then that step
    (the separate pass); ``mk.optim.AdamW`` (the penalty in the step); ``mk.optim.AdamW`` before any
    ``consolidate()`` (its step without a penalty). lr = 0, as in the training-step rows: the update is
    computed and stored in full, but the parameters do not drift over hundreds of rounds (the moments
    do, as in training). ``notes["added"]``: the time the penalty adds to a fused AdamW step, fused
    into the step, as a fraction of what the separate pass adds (target: <= 0.5).
    """
    shapes = PARAM_LISTS[model](width)
    n = sum(math.prod(s) for s in shapes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    flat = torch.randn(n, generator=gen).to(device)
    net = _ParamList(flat, shapes)
    for p in net.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen).to(device)
    mas = mk.MAS(net, lam=LAM)
    # One consolidated task: random Omega, theta* = theta + a small drift, so every term is nonzero.
    names = list(dict(net.named_parameters()))
    mas.load_state_dict({"omega": {k: torch.rand(p.shape, generator=gen).to(device)
                                   for k, p in zip(names, net.parameters())},
                         "anchors": {k: p.detach() + 0.01 * torch.randn(p.shape, generator=gen).to(device)
                                     for k, p in zip(names, net.parameters())},
                         "accumulator": {k: torch.zeros_like(p) for k, p in zip(names, net.parameters())},
                         "num_samples": 0, "num_batches": 0, "samples_consolidated": 1, "num_tasks": 1})
    params = list(net.parameters())
    fused = torch.optim.AdamW(params, lr=0.0, fused=True)
    ours = mk.optim.AdamW(params, lr=0.0, mas=mas)
    ours_plain = mk.optim.AdamW(params, lr=0.0, mas=mk.MAS(net, lam=LAM))  # no consolidate(): no penalty

    def separate():
        mas.add_penalty_grad_()  # adds into .grad: LAM is small, so hundreds of rounds keep it finite
        fused.step()

    impls = {"AdamW(fused=True)": fused.step, "+ add_penalty_grad_() (separate pass)": separate,
             "mk.optim.AdamW (penalty in the step)": ours.step, "mk.optim.AdamW, no penalty": ours_plain.step}
    bpe = 36  # read p, grad, m, v, theta*, Omega; write p, m, v (fp32)
    impls["copy bound"] = _copy_bound(n * bpe, device)
    return Case("optim_step", "float32", f"{model} x{width:g} ({len(shapes)} tensors, {n / 1e6:.2f}M)", n, "bytes",
                n * bpe, impls, bound="copy bound", baseline="AdamW(fused=True)")


def added_fraction(rows: list[dict]) -> float | None:
    """For one ``optim_step`` case's rows: (ours - fused AdamW) / (separate - fused AdamW), from the
    per-round ratios to the fused AdamW step."""
    by = {r["impl"]: r["ratio_to_baseline"] for r in rows}
    sep, ours = by.get("+ add_penalty_grad_() (separate pass)"), by.get("mk.optim.AdamW (penalty in the step)")
    if sep is None or ours is None or sep <= 1.0:
        return None
    return (ours - 1.0) / (sep - 1.0)


#: The conv_exact section's shapes (N, C_in, C_out, HxW, kernel, stride, groups): the layers of the reduced
#: ResNet-18 (batch 32) and of the small CNN (batch 16), the shapes of DESIGN.md's table, depthwise layers.
CONV_EXACT_SHAPES = (
    (32, 3, 20, 32, 3, 1, 1), (32, 20, 20, 32, 3, 1, 1), (32, 20, 40, 32, 3, 2, 1), (32, 40, 40, 16, 3, 1, 1),
    (32, 20, 40, 32, 1, 2, 1), (32, 40, 80, 16, 3, 2, 1), (32, 80, 80, 8, 3, 1, 1), (32, 80, 160, 8, 3, 2, 1),
    (32, 160, 160, 4, 3, 1, 1), (32, 80, 160, 8, 1, 2, 1),
    (16, 3, 16, 32, 3, 1, 1), (16, 16, 16, 32, 3, 1, 1), (16, 16, 32, 32, 3, 2, 1), (16, 32, 32, 16, 3, 1, 1),
    (16, 32, 64, 16, 3, 2, 1), (16, 64, 64, 8, 3, 1, 1),
    (16, 64, 64, 32, 3, 1, 1), (64, 64, 64, 32, 3, 1, 1), (16, 128, 128, 16, 3, 1, 1), (16, 256, 256, 8, 3, 1, 1),
    (32, 64, 64, 16, 3, 1, 64), (32, 128, 128, 8, 3, 1, 128), (32, 64, 64, 16, 3, 1, 4),
)


def conv_exact_case(n: int, c: int, o: int, hw: int, k: int, stride: int, groups: int, device: torch.device) -> Case:
    """The exact rule's conv weight numerator ``sum_k |g_k|`` by each strategy of ``conv_exact.py`` (and the one
    its table chooses) against the batch weight gradient of the same layer (``--only conv_exact`` re-measures
    the crossover table, :data:`mas_kernels.estimators.rules.conv_exact.CROSSOVER`)."""
    from mas_kernels.estimators.rules import conv_exact

    torch.manual_seed(0)
    conv = nn.Conv2d(c, o, k, stride, k // 2, groups=groups, bias=False).to(device)
    x = torch.randn(n, c, hw, hw, device=device)
    with torch.no_grad():
        d = torch.randn_like(conv(x))
    omega = torch.zeros_like(conv.weight)
    budget = 256 << 20

    def plain():
        torch.nn.grad.conv2d_weight(x, conv.weight.shape, d, stride, k // 2, 1, groups)

    impls = {"plain weight-grad bound": plain}
    strategies = [st for st in conv_exact.STRATEGIES if st != "native" or conv_exact._native_runs(device)]
    for st in strategies:
        impls[st] = lambda st=st: conv_exact.conv_weight_abs_sum_(omega, x, d, conv, budget, st)
    chosen = conv_exact.choose(conv, x, d)
    flops = 2.0 * n * o * (c // groups) * k * k * d.shape[2] * d.shape[3]
    return Case("conv_exact", "float32", f"N={n} {c}->{o} {hw}x{hw} k{k} s{stride} g{groups}", flops / 2, "flops",
                flops, impls, bound="plain weight-grad bound", baseline="unfold", notes={"chosen": chosen})


# ----------------------------------------------------------------- end to end
def _mlp(hidden: int, n_in: int = 784, n_out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _model(kind: str, device: torch.device, batch: int):
    torch.manual_seed(0)
    if kind.startswith("mlp"):
        hidden = int(kind.split("-")[1])
        model, x = _mlp(hidden), torch.randn(batch, 784)
    else:
        model, x = _cnn(), torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return model.to(device), x.to(device), y.to(device)


def _optimizer(kind: str, model: nn.Module):
    """Adam for the MLPs, SGD with momentum for the CNN, at learning rate 0.

    The update is computed and applied in full (a zero step costs what any
    step costs), but the models do not move: hundreds of timed steps on one
    batch would otherwise drive the compared copies apart, and their costs
    with them (measured here, MLP with and without the MAS penalty over
    2,000-3,000 steps: the ratio read 0.76-0.97 at lr 1e-3, 1.08 at lr 0).
    """
    if kind.startswith("mlp"):
        return torch.optim.Adam(model.parameters(), lr=0.0)
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)


def _consolidated_mas(model: nn.Module, x: torch.Tensor):
    mas = mk.MAS(model, lam=1.0, importance="local")
    with torch.no_grad(), mas.accumulating():
        model(x)
    mas.consolidate()
    return mas


def train_case(kind: str, batch: int, device: torch.device) -> Case:
    """One training step (zero_grad, forward, loss, backward, optimizer step) with and without MAS."""
    base, x, y = _model(kind, device, batch)
    models = {k: copy.deepcopy(base) for k in ("plain", "fused", "autograd", "avalanche")}
    opts = {k: _optimizer(kind, m) for k, m in models.items()}
    mas_fused = _consolidated_mas(models["fused"], x)
    mas_autograd = _consolidated_mas(models["autograd"], x)
    names = [n for n, _ in models["avalanche"].named_parameters()]
    omega = {n: mas_fused.omega[n].clone() for n in names}
    anchors = {n: mas_fused.anchors[n].clone() for n in names}

    def step(key: str, extra_loss=None, after_backward=None):
        model, opt = models[key], opts[key]

        def run():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()

        return run

    def avalanche_penalty():
        loss = 0.0
        for n, p in models["avalanche"].named_parameters():
            loss = loss + (omega[n] * (p - anchors[n]).pow(2)).sum()
        return 1.0 * loss

    impls = {
        "plain step": step("plain"),
        "+ mas.add_penalty_grad_()": step("fused", after_backward=mas_fused.add_penalty_grad_),
        "+ mas.penalty() in the loss": step("autograd", extra_loss=mas_autograd.penalty),
        "+ avalanche-style penalty": step("avalanche", extra_loss=avalanche_penalty),
    }
    n_params = sum(p.numel() for p in base.parameters())
    return Case("train_step", "float32", f"{kind} batch {batch} ({n_params / 1e6:.2f}M params)", n_params, "steps",
                1.0, impls, baseline="plain step")


def inference_case(kind: str, batch: int, device: torch.device) -> Case:
    """Inference under no_grad, plain and with online local importance (inside ``mas.accumulating()``)."""
    base, x, _ = _model(kind, device, batch)
    plain_model, mas_model = base.eval(), copy.deepcopy(base).eval()
    mas = mk.MAS(mas_model, lam=1.0, importance="local")
    session = contextlib.ExitStack()
    session.enter_context(mas.accumulating())

    def plain():
        with torch.no_grad():
            plain_model(x)

    def online():
        with torch.no_grad():
            mas_model(x)

    n_params = sum(p.numel() for p in base.parameters())
    case = Case("inference", "float32", f"{kind} batch {batch} ({n_params / 1e6:.2f}M params)", n_params, "steps",
                1.0, {"plain": plain, "online local importance": online}, baseline="plain")
    case.notes["_session"] = session  # closed after measuring
    return case


def importance_case(kind: str, device: torch.device, quick: bool, peers: bool = True, batches: int = 1) -> Case:
    """One estimated batch per rule (exact global, global_batch, local) against a plain forward+backward, and
    the per-sample peers (Opacus, BackPACK, torch.func ``vmap(grad)``: :mod:`bench.peers`) where they are
    installed and right.

    ``batches``: each timed call runs that many batches back to back (one ``estimate()`` over them; the plain
    pass and the peers as many times), as a DataLoader feeds them; with 1 each call runs between the other
    implementations' calls, with caches they left cold.

    Correctness: the exact rule and every peer against a float64 per-sample oracle on CPU (``notes["oracle"]``);
    a peer that is wrong or raises is not timed (its reason is in the notes)."""
    model, batch, output_fn, label = build(kind, quick)
    model = model.to(device).eval()
    batch = ({k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device))
    output_fn = output_fn or (lambda o: o)
    run = (lambda m: m(**batch)) if isinstance(batch, dict) else (lambda m: m(batch))

    def plain():
        for _ in range(batches):
            loss = output_fn(run(model)).float().pow(2).sum()
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    impls = {"plain forward+backward": plain}
    data = [batch] * batches
    for imp, name in (("global", "exact global"), ("global_batch", "global_batch"), ("local", "local")):
        # Per batch in steady state: the probe runs once per wrapper (the warm call below), the self-check
        # once per estimate() call; what both add to an estimate() is the row of selfcheck_case.
        mas = mk.MAS(model, importance=imp, output_fn=output_fn, verify=False)
        impls[name] = lambda mas=mas: mas.estimate(data)
    notes = {} if quick else {"peak_mb": {}}


    notes: dict = {"threads": torch.get_num_threads()}
    if peers and device.type == "cpu":
        from . import peers as peer_mod

        expected = peer_mod.oracle(model, batch, output_fn)
        n = peer_mod._n(batch)
        ours = mk.MAS(model, importance="global", output_fn=output_fn).estimate([batch]).consolidate()
        wrong = peer_mod.check({k: v * n for k, v in ours.omega.items()}, expected)
        oracle = {"exact global": "ok" if not wrong else f"WRONG on {wrong[:3]}"}
        for name in peer_mod.PEERS:
            fn, why = peer_mod.build(name, model, batch, output_fn, expected)
            if fn is None:
                oracle[name] = why
            else:
                oracle[name] = "ok"
                impls[f"peer: {name}"] = fn if batches == 1 else (lambda fn=fn: [fn() for _ in range(batches)])
        notes["oracle"] = oracle
    notes["peak_mb"] = {}
    for name, fn in impls.items():
        fn()  # warm (and the first call allocates the wrapper's state)
        if not quick:  # the peak memory costs a run of its own
            notes["peak_mb"][name] = round(peak_memory(fn) / 2**20, 1)
    n_params = sum(p.numel() for p in model.parameters())
    return Case("importance", "float32", f"{label} ({n_params / 1e6:.2f}M params)", n_params, "steps", 1.0,
                impls, baseline="plain forward+backward", notes=notes)


def selfcheck_case(kind: str, device: torch.device, quick: bool, batches: int = 20) -> Case:
    """What observing the layout (the probe) and the self-check add to an ``estimate()`` over ``batches``
    batches of the exact rule, on wrappers built and warmed outside the timed rounds (what is timed is
    the estimate alone): ``verify=False`` with the layout already observed (the batches alone); the
    default ``verify=True`` with the layout observed (what each later ``estimate()`` of a wrapper pays:
    the self-check on its first batch); and with the wrapper's observed layouts dropped before each
    round (a wrapper's first ``estimate()`` of a call signature: the probe too)."""
    model, batch, output_fn, label = build(kind, quick)
    model = model.to(device).eval()
    batch = ({k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device))
    output_fn = output_fn or (lambda o: o)
    data = [batch] * batches
    steady = mk.MAS(model, importance="global", output_fn=output_fn, verify=False)
    checked = mk.MAS(model, importance="global", output_fn=output_fn)
    first = mk.MAS(model, importance="global", output_fn=output_fn)
    for mas in (steady, checked, first):
        mas.estimate([batch])  # the state allocated and the layout observed, outside the timed rounds

    def probed():
        first._layouts.cache.clear()  # the layouts observed so far (internal): the next batch is probed again
        first.estimate(data)

    impls = {f"{batches} batches": lambda: steady.estimate(data),
             f"{batches} batches + self-check": lambda: checked.estimate(data),
             f"{batches} batches + probe + self-check": probed}
    n_params = sum(p.numel() for p in model.parameters())
    return Case("selfcheck", "float32", f"{label}, {batches} batches", n_params, "estimates", 1.0, impls,
                baseline=f"{batches} batches")


# ----------------------------------------------------------------- the list the CLI runs
def plan(quick: bool, device: torch.device, use_compile: bool,
         models: list[str] | None = None) -> list[tuple[str, Callable[[], Case]]]:
    """The cases to run, in order, as (section, builder); ``models``: only these models' importance and
    selfcheck rows."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        penalty = [(fp32, 0.25), (bf16, 0.25)]
        accumulate = (0.25,)
        outer = [(fp32, (64, 256, 256)), (fp32, (256, 1024, 1024)), (bf16, (256, 1024, 1024))]
        convs = ((16, 32, 32, 16),)
        e2e = (("mlp-400", 64), ("cnn", 32))
    else:
        widths = (0.125, 0.25, 0.5, 1.0)
        penalty = [(d, w) for d in (fp32, bf16) for w in widths]
        accumulate = widths
        shapes = ((64, 256, 256), (256, 1024, 1024), (1024, 2048, 2048))
        outer = [(d, s) for d in (fp32, bf16) for s in shapes]
        convs = ((16, 32, 32, 16), (64, 64, 64, 32))
        # The demo's MLP at its batch size and at 4x; a wider MLP; a small CNN.
        e2e = (("mlp-400", 64), ("mlp-400", 256), ("mlp-1024", 128), ("cnn", 32))
    penalty = [("resnet50", d, w) for d, w in penalty]
    if device.type == "cuda" and not quick:
        # The transformer-like list (109M elements, 1.75 GB of fp32 p/theta*/Omega/grad) on a GPU only.
        penalty += [("transformer", fp32, 1.0), ("transformer", bf16, 1.0)]
    cases: list[tuple[str, Callable[[], Case]]] = []
    for model, dtype, w in penalty:
        cases.append(("penalty", lambda m=model, w=w, d=dtype: penalty_case(w, d, device, use_compile, quick, m)))
    for w in accumulate:
        cases.append(("abs_accumulate", lambda w=w: abs_accumulate_case(w, fp32, device)))
    for dtype, (n, j, i) in outer:
        cases.append(("abs_outer", lambda n=n, j=j, i=i, d=dtype: abs_outer_case(n, j, i, d, device)))
    for spec in convs:
        cases.append(("conv", lambda s=spec: conv_case(*s, fp32, device)))
    # The fused optimizer step: the ResNet-50 list, and the BERT-base one (4.4 GB of fp32 state) off --quick.
    for model, w in ((("resnet50", 0.25),) if quick else (("resnet50", 1.0), ("transformer", 1.0))):
        cases.append(("optim", lambda m=model, w=w: optim_case(m, device, w)))


    for spec in (CONV_EXACT_SHAPES[:3] if quick else CONV_EXACT_SHAPES):
        cases.append(("conv_exact", lambda s=spec: conv_exact_case(*s, device)))
    for kind, batch in e2e:
        cases.append(("e2e", lambda k=kind, b=batch: train_case(k, b, device)))
    for kind, batch in e2e:
        cases.append(("e2e", lambda k=kind, b=batch: inference_case(k, b, device)))
    for kind in models or (("resnet18", "cnn-small", "gpt2", "lstm") if quick else KINDS):
        cases.append(("importance", lambda k=kind: importance_case(k, device, quick)))
    for kind in models or (("readme", "mlp-demo") if quick else
                           ("readme", "mlp-demo", "mlp", "resnet18", "gpt2", "bert", "lstm")):
        cases.append(("selfcheck", lambda k=kind: selfcheck_case(k, device, quick)))
    if not quick:  # the frameworks' own loops, where they are installed
        from .integrations import plan as integrations

        cases += integrations(device)
    return cases
