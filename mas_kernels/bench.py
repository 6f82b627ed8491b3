r"""``python -m mas_kernels bench [--quick] [--json PATH] [--plot PATH]``: the ops against
the peers' way and against the physical bound, side by side in one run.

Every case builds its inputs once, then times all its implementations in
interleaved rounds (round r runs them in a rotated order), so a machine whose
load changes during the run slows every implementation alike. Each row
reports the median time with the 20% and 80% quantiles, and two ratios of
times (lower is better):

* ``ratio_to_bound``: ``seconds / seconds of the bound``. Elementwise ops are
  bound by memory: the bound is ``Tensor.copy_`` of a buffer such that the copy
  reads and writes the same number of bytes as the op moves (penalty+grad in
  fp32: read p, anchor, Omega, grad, write grad = 20 bytes per element, so a
  copy reading 10 and writing 10 bytes per element). Matmul-like ops are
  bound by compute: the bound is the plain matmul (or plain convolution
  weight-gradient) of the same shape and dtype.
* ``ratio_to_baseline``: ``seconds / seconds of the baseline``, the way users
  do it today: the Avalanche-style loop for the penalty (a loss term per
  parameter, autograd for the gradient), ``omega.addmm_(|a|^T, |b|)`` for the
  importance, unfold+einsum for conv importance, the per-tensor PyTorch loop
  for ``abs_accumulate_``, the step without MAS for end-to-end rows
  (``(ratio - 1) * 100`` is the overhead in %).

The sections: penalty+grad over a ResNet-50-like parameter list (161 tensors,
25.6M elements, and the same list at 1/8..1/2 width for the throughput
curve), fp32 and bf16 parameters; ``abs_accumulate_`` over the same list;
``abs_outer_accumulate_`` (Linear importance) and the conv rule; end to end,
a training step of an MLP and a small CNN with and without the MAS penalty,
and inference with online local importance against plain inference.
``--quick`` runs smaller sizes and fewer rounds (well under a minute on two
cores) and skips ``torch.compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _backend, _native

LAM = 1e-3  # small, so grads that accumulate over hundreds of timed calls stay finite in bf16


# ----------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU model and cores, threads, versions, GPU name, load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "native_kernels": _native.available(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["loadavg_start"] = _loadavg()
    return info


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def device_label(info: dict) -> str:
    if "gpu" in info:
        return info["gpu"]
    return f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} threads)"


# ----------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impls: dict[str, Callable], device: torch.device, reps: int, warmup: int = 2,
            budget_s: float = 3.0) -> dict[str, list[float]]:
    """Times of each callable, in interleaved rounds with a rotating order.

    An implementation gets as many timings as fit in ``budget_s``, at least 3
    and at most ``reps``: fast calls get many rounds (on a shared machine a
    few ms step needs a hundred or more for a stable median), the slow
    per-sample loops few.
    """
    names = list(impls)
    single = {}
    for name in names:
        for _ in range(max(1, warmup)):
            _sync(device)
            t0 = time.perf_counter()
            impls[name]()
            _sync(device)
            single[name] = time.perf_counter() - t0
    want = {n: max(3, min(reps, int(budget_s / max(single[n], 1e-9)))) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(want.values())):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if len(times[name]) >= want[name]:
                continue
            _sync(device)
            t0 = time.perf_counter()
            impls[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(ts: list[float]) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile)."""
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def ratio(ts: list[float], ref: list[float]) -> float:
    """How many times ``ref``'s time ``ts`` takes.

    When both ran in every round, the median over rounds of ``ts[r] / ref[r]``
    (the two ran back to back): on a shared machine the load drifts over a
    case's seconds, and a ratio within each round cancels the drift where a
    ratio of medians does not (measured on the 2-core box, the MLP step
    overhead over three runs of 2,400-2,900 rounds: 1.02-1.12 as a ratio of
    medians, 1.078-1.088 paired). When one of them was cut short by the time
    budget (the slow loops, which ran in the first rounds only), the ratio of
    the medians: its few rounds are not a fair sample of the other's.
    """
    if len(ts) == len(ref):
        return statistics.median(t / r for t, r in zip(ts, ref))
    return statistics.median(ts) / statistics.median(ref)


def torch_path(fn: Callable) -> Callable:
    """``fn`` (an op's PyTorch implementation) as the ops' Python kernels run it: under ``no_grad``."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


# ----------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """One size of one op: its implementations and what the numbers mean."""

    op: str
    dtype: str
    size: str         # human label
    n: float          # x axis of the plot: elements, or N*J*I for matmul-like ops
    unit: str         # "bytes" or "flops": what ``amount`` counts
    amount: float     # bytes moved (elementwise ops) or flops (matmul-like ops), per call
    impls: dict
    bound: str | None = None
    baseline: str | None = None
    notes: dict = dataclasses.field(default_factory=dict)


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
        return _ops().penalty_grad_(params, anchors, omegas, lam, grads)

    detached = [p.detach() for p in params]

    def ours_op():
        # What mk.MAS runs every step: the registered op on lists it validated once.
        return torch.ops.mas_kernels.penalty_grad_(detached, anchors, omegas, lam, grads)

    def ours_flat():
        return _ops().penalty_grad_([p_flat], [a_flat], [o_flat], lam, [g_flat])

    bpe = 2 * dtype.itemsize + 4 + 2 * dtype.itemsize  # read p, anchor, Omega, grad; write grad
    impls = {"avalanche loop": avalanche, "foreach": foreach, "ours": ours, "ours, torch.ops (as mk.MAS)": ours_op,
             "ours, 1 flat tensor": ours_flat}
    if ours_backend(device) != "torch":
        from mas_kernels.ops.penalty import penalty_grad_torch

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
                _sync(device)
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
        _ops().abs_accumulate_(omegas, tensors, alpha)

    from mas_kernels.ops.abs_accumulate import abs_accumulate_torch

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
        _ops().abs_outer_accumulate_(omega, a, b, alpha)

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
    from .mas import MAS

    mas = MAS(model, lam=1.0, importance="local")
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
    from .mas import MAS

    mas = MAS(mas_model, lam=1.0, importance="local")
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


# ----------------------------------------------------------------- running
def _ops():
    import mas_kernels

    return mas_kernels


def ours_backend(device: torch.device) -> str:
    """What "ours" runs on ``device`` under the default backend: native, triton or torch."""
    return _backend.choose(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_case(case: Case, device: torch.device, reps: int, info: dict, quick: bool = False) -> list[dict]:
    times = measure(case.impls, device, reps, warmup=1 if quick else 2, budget_s=1.0 if quick else 2.0)
    session = case.notes.pop("_session", None)
    if session is not None:
        session.close()
    stats = {k: summarize(v) for k, v in times.items()}
    rows = []
    for impl, (med, q20, q80) in stats.items():
        row = {
            "op": case.op, "impl": impl, "device": device_label(info), "dtype": case.dtype, "size": case.size,
            "n": case.n, "seconds": med, "q20": q20, "q80": q80, "reps": len(times[impl]),
            case.unit: case.amount,
            "ratio_to_bound": ratio(times[impl], times[case.bound]) if case.bound else None,
            "ratio_to_baseline": ratio(times[impl], times[case.baseline]) if case.baseline else None,
            "is_bound": impl == case.bound,
        }
        if case.notes:
            row["notes"] = dict(case.notes)
        rows.append(row)
    return rows


def plan(quick: bool, device: torch.device, use_compile: bool) -> list[tuple[str, Callable[[], Case]]]:
    """The cases to run, in order, as (section, builder)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if quick:
        penalty = [(fp32, 0.25), (fp32, 1.0), (bf16, 0.25)]
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
    for kind, batch in e2e:
        cases.append(("e2e", lambda k=kind, b=batch: train_case(k, b, device)))
    for kind, batch in e2e:
        cases.append(("e2e", lambda k=kind, b=batch: inference_case(k, b, device)))
    return cases


# ----------------------------------------------------------------- output
def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def _throughput(row: dict) -> str:
    if "bytes" in row:
        return f"{row['bytes'] / row['seconds'] / 1e9:6.1f} GB/s"
    if "flops" in row:
        return f"{row['flops'] / row['seconds'] / 1e9:6.1f} GFLOP/s"
    return ""


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: one line per (op, dtype, size, impl)."""
    head = ("op", "dtype", "size", "impl", "median ms", "[q20, q80] ms", "throughput", "x bound", "x baseline")
    lines = []
    for r in rows:
        ratio_b = "" if r["ratio_to_bound"] is None else f"{r['ratio_to_bound']:.2f}"
        rb = r["ratio_to_baseline"]
        if rb is None:
            ratio_base = ""
        elif r["op"] in ("train_step", "inference"):
            ratio_base = f"{rb:.3f} ({(rb - 1) * 100:+.1f}%)"
        else:
            ratio_base = f"{rb:.3f}" + (f" ({1 / rb:.1f}x faster)" if rb < 0.95 else "")
        lines.append((r["op"], r["dtype"], r["size"], r["impl"], _fmt_time(r["seconds"]),
                      f"[{_fmt_time(r['q20'])}, {_fmt_time(r['q80'])}]", _throughput(r), ratio_b, ratio_base))
    widths = [max(len(h), *(len(x[k]) for x in lines)) if lines else len(h) for k, h in enumerate(head)]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(head, widths)), sep.join("-" * w for w in widths)]
    prev = None
    for x in lines:
        key = x[:3]
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(sep.join(v.ljust(w) for v, w in zip(x, widths)).rstrip())
    return "\n".join(out)


def plot(rows: list[dict], info: dict, path: str) -> None:
    """Throughput against size per implementation, the bound as a dashed line; end-to-end as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = []
    for r in rows:
        if r["op"] in ("train_step", "inference"):
            continue
        key = (r["op"], r["dtype"])
        if key not in sweeps:
            sweeps.append(key)
    e2e = [r for r in rows if r["op"] in ("train_step", "inference")]
    n_plots = len(sweeps) + (1 if e2e else 0)
    cols = 3
    rows_n = max(1, math.ceil(n_plots / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (op, dtype) in zip(axes.flat, sweeps):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
        unit = "bytes" if "bytes" in sel[0] else "flops"
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["n"], r[unit] / r["seconds"] / 1e9) for r in sel if r["impl"] == impl)
            xs, ys = zip(*pts)
            if sel and any(r["impl"] == impl and r["is_bound"] for r in sel):
                ax.plot(xs, ys, "k--", lw=2, label=f"{impl}")
            else:
                ax.plot(xs, ys, "o-", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements" if unit == "bytes" else "N*J*I (multiply-adds)")
        ax.set_ylabel("GB/s (effective)" if unit == "bytes" else "GFLOP/s")
        ax.set_title(f"{op} ({dtype})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if e2e:
        # Overhead against the plain step / plain inference of the same model, in %.
        ax = axes.flat[len(sweeps)]
        bars = [r for r in e2e if r["impl"] not in ("plain step", "plain")]
        ax.barh(range(len(bars)), [(r["ratio_to_baseline"] - 1) * 100 for r in bars],
                color=["C0" if r["op"] == "train_step" else "C1" for r in bars])
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([f"{r['size'].split(' (')[0]}: {r['impl']}" for r in bars], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(10, color="k", ls="--", lw=1)
        ax.set_xlabel("overhead vs plain step / plain inference (%), median times")
        ax.set_title("end to end (blue: training step, orange: inference)")
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[n_plots:]:
        ax.axis("off")
    fig.suptitle(f"mas_kernels bench on {device_label(info)}, torch {info['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mas_kernels bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds, no torch.compile (< 1 min)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine description as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a throughput-vs-size plot (PNG)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="comma-separated subset of: penalty,abs_accumulate,abs_outer,conv,e2e")
    parser.add_argument("--reps", type=int, help="at most this many timed rounds per implementation, as many as "
                        "fit in ~2 s (1 s with --quick) (default 20 with --quick, else 200)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    reps = args.reps or (20 if args.quick else 200)
    use_compile = not args.quick and not args.no_compile
    sections = set(args.only.split(",")) if args.only else None
    info = machine_info(device)
    info["ours_backend"] = ours_backend(device)
    print(f"mas_kernels bench on {device_label(info)}; torch {info['torch']}; native CPU kernels: "
          f"{'yes' if info['native_kernels'] else 'no (' + _native.load_error() + ')'}; "
          f"load average {info['loadavg_start']}", flush=True)
    print(f"'ours' = the mas_kernels op with the default backend, here {info['ours_backend']}; "
          "times are medians [20%, 80% quantiles]; x bound, x baseline: medians of the per-round ratios "
          "(each round runs every implementation back to back), or ratios of medians where one side had fewer "
          "rounds", flush=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    for section, build in plan(args.quick, device, use_compile):
        if sections is not None and section not in sections:
            continue
        case = build()
        t0 = time.perf_counter()
        case_rows = run_case(case, device, reps, info, args.quick)
        rows.extend(case_rows)
        note = f"  [{'; '.join(f'{k}: {v}' for k, v in case.notes.items())}]" if case.notes else ""
        print(f"  {case.op} {case.dtype} {case.size}: {time.perf_counter() - t0:.1f} s{note}", file=sys.stderr,
              flush=True)
        del case
    info["loadavg_end"] = _loadavg()
    info["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print()
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {info['total_seconds']} s; load average at the end {info['loadavg_end']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "reps": reps, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(rows, info, args.plot)
        print(f"wrote {args.plot}")
    return 0
