"""Compile audit: what every Triton kernel of the ops becomes on a real GPU, without a GPU.

``python -m mas_kernels.audit [--json PATH] [--arch 80 90] [--ci] [--jobs N]``

The Triton interpreter checks numerics, not machine code. This module calls
each op's Triton launcher with realistic arguments (CPU tensors: their
allocations are 64-byte aligned, as a CUDA allocation is at least 16-byte
aligned, and views keep their storage offsets), catches every kernel launch
instead of running it, and compiles what the launch would have compiled for
each target architecture and each autotune config: the signature, the
``tt.divisibility`` attributes and the int specializations come from
Triton's own JIT binder fed with the launch's arguments, so the audit sees
exactly the kernel a GPU would get. It then reads the results:

* ``ptxas -v``: registers per thread and spill bytes (stores + loads);
* the compiled kernel's shared memory against the architecture's limit;
* the PTX: the widths of global data accesses (``ld.global``, ``st.global``,
  ``cp.async`` global->shared), per source line through the PTX ``.loc``
  line info, and the tensor-core instructions (``mma.sync``, ``wgmma``);
* the TTGIR: which source lines access tensors (data) and which read scalars
  (the address table, one partial sum per program), and which tensor
  accesses are unmasked (the full-chunk path of the multi-tensor kernels);
* the signature: whether the step-varying scalars are runtime arguments.

The kernels audited are the rows of :data:`ENTRIES`, one small
:class:`Entry` per op launcher. Adding a kernel is adding a row: the
launcher's ``"module:function"``, a function returning its :class:`Case`
list (the argument sets to call it with), and the names of its step-varying
scalars. Nothing else in this module knows about particular kernels.

The audit must run without the interpreter (``TRITON_INTERPRET`` unset):
under it ``triton.jit`` builds interpreted functions and autotune configs are
collapsed to one. ``tests/test_audit.py`` runs the ``--ci`` subset in a
subprocess for that reason.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import json
import linecache
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

# sm -> the most shared memory one block may use (bytes; the opt-in maximum,
# which Triton requests for kernels over 48 KiB): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
SHORT = {F32: "f32", F16: "f16", BF16: "bf16"}


# --------------------------------------------------------------------- entries
@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: ``args()`` builds its arguments (CPU tensors).

    ``dtypes``: the input dtypes by argument name, for the report; ``label``
    says what else is particular (layout, alignment); ``allow_tf32`` is
    ``torch.backends.cuda.matmul.allow_tf32`` during the call; ``ci``: part
    of the subset every CI run compiles.
    """

    label: str
    dtypes: dict[str, str]
    args: Callable[[], tuple]
    allow_tf32: bool = False
    ci: bool = False
    # Checks that only hold for this case (see check()): "vector_io" means every
    # global data access of a tile kernel is 128 bits wide (aligned shapes).
    expect: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Triton launcher to audit.

    ``op``: the name in reports; ``launcher``: ``"module:function"``, called
    as ``launcher(*case.args())``; ``cases``: returns the :class:`Case` list;
    ``scalars``: the kernel parameters that change from step to step (they
    must be runtime arguments, never ``tl.constexpr``: a new value would
    recompile); ``chunked``: the kernel works in chunks with an unmasked
    full-chunk path and a masked tail (the multi-tensor kernels), so
    ``full_chunk_path`` is reported for it; ``tensor_cores``: a matmul-like
    kernel, which must use tensor-core instructions when every input is 16-bit.
    """

    op: str
    launcher: str
    cases: Callable[[], list[Case]]
    scalars: tuple[str, ...]
    chunked: bool = False
    tensor_cores: bool = False


def _zeros(*shape, dtype=F32):
    return torch.zeros(*shape, dtype=dtype)


def _abs_outer_cases() -> list[Case]:
    cases = []
    # N, J, I: a Linear layer's batch, outputs and inputs; every dim a multiple
    # of 16 (the shapes of most layers), then an MNIST-head-like odd one.
    aligned, odd = (256, 512, 768), (64, 10, 400)
    for (da, db), a_layout, tf32 in itertools.product(itertools.product(DTYPES, DTYPES),
                                                      ("contiguous", "transposed"), (False, True)):
        if tf32 and F32 not in (da, db):
            continue  # allow_tf32 only changes fp32 inputs
        for (n, j, i), shape in ((aligned, "aligned"), (odd, "odd")):
            def args(n=n, j=j, i=i, da=da, db=db, a_layout=a_layout):
                a = _zeros(n, j, dtype=da) if a_layout == "contiguous" else _zeros(j, n, dtype=da).t()
                return _zeros(j, i), a, _zeros(n, i, dtype=db), 0.5
            # CI: every config of each precision rule once per arch, and both of a's layouts:
            # fp32 FMA and fp16 tensor cores with a contiguous, the TF32 rule (f16 x bf16)
            # with a transposed (the launcher then swaps a and b).
            ci = shape == "aligned" and not tf32 and ((a_layout == "contiguous" and (da, db) in ((F32, F32), (F16, F16)))
                                                      or (a_layout == "transposed" and (da, db) == (F16, BF16)))
            label = f"{shape} N,J,I={n},{j},{i}; a {a_layout}" + ("; allow_tf32" if tf32 else "")
            cases.append(Case(label, {"a": SHORT[da], "b": SHORT[db]}, args, allow_tf32=tf32, ci=ci,
                              expect=("vector_io",) if shape == "aligned" else ()))
    return cases


# Tensor sizes of the multi-tensor cases: a Linear(784, 400) + bias, a bias of 10
# (a tensor shorter than one chunk), and one whose last chunk is partial.
_SIZES = (400 * 784, 400, 10, 5000)


def _lists(dtypes, sizes, misaligned):
    """One list per dtype; ``misaligned``: the third tensor is a view 4 bytes into its storage."""
    out = []
    for dt in dtypes:
        ts = [_zeros(n, dtype=dt) for n in sizes]
        if misaligned:
            ts[2] = _zeros(sizes[2] + 2, dtype=dt)[2:] if dt != F32 else _zeros(sizes[2] + 1, dtype=dt)[1:]
        out.append(ts)
    return out


def _abs_accumulate_cases() -> list[Case]:
    cases = []
    for dt, misaligned in itertools.product(DTYPES, (False, True)):
        def args(dt=dt, misaligned=misaligned):
            omegas, tensors = _lists((F32, dt), _SIZES, misaligned)
            return omegas, tensors, 0.5
        cases.append(Case("a misaligned view" if misaligned else "aligned", {"tensors": SHORT[dt]}, args,
                          ci=dt in (F32, BF16) and not misaligned or (dt == F16 and misaligned)))
    return cases


def _penalty_cases() -> list[Case]:
    cases = []
    for (dp, da, dg), misaligned in itertools.product(itertools.product(DTYPES, DTYPES, DTYPES), (False, True)):
        def args(dp=dp, da=da, dg=dg, misaligned=misaligned):
            params, anchors, omegas, grads = _lists((dp, da, F32, dg), _SIZES, misaligned)
            return params, anchors, omegas, 0.5, grads
        ci = (not misaligned and (dp, da, dg) in ((BF16, BF16, BF16), (F16, F32, F16))) or (dp, da, dg) == (F32, F32, F32)
        cases.append(Case("a misaligned view" if misaligned else "aligned",
                          {"params": SHORT[dp], "anchors": SHORT[da], "grads": SHORT[dg]}, args, ci=ci))
    return cases


def _adam_step_cases() -> list[Case]:
    # fp32 (params, grads and state alike, as torch.optim keeps them), 16-bit storage, amsgrad, no
    # penalty (a parameter the wrapper does not track), and a misaligned view (the masked path).
    cases = []
    for dt, amsgrad, penalty, misaligned in ((F32, False, True, False), (F32, False, True, True),
                                             (F32, True, True, False), (F32, False, False, False),
                                             (BF16, False, True, False), (F16, True, True, True)):
        def args(dt=dt, amsgrad=amsgrad, penalty=penalty, misaligned=misaligned):
            params, grads, m, v, vmax = _lists((dt,) * 5, _SIZES, misaligned)
            anchors, omegas = _lists((dt, F32), _SIZES, misaligned) if penalty else ([], [])
            steps = [torch.tensor(3.0) for _ in _SIZES]
            return (params, grads, m, v, vmax if amsgrad else [], steps, anchors, omegas, 0.5, 1e-3, 0.9, 0.999,
                    1e-8, 0.01, True, False)
        label = ", ".join(["a misaligned view" if misaligned else "aligned"] + (["amsgrad"] if amsgrad else [])
                          + ([] if penalty else ["no penalty"]))
        ci = (dt, amsgrad, penalty, misaligned) in ((F32, False, True, False), (F32, False, True, True),
                                                    (BF16, False, True, False))
        cases.append(Case(label, {"params": SHORT[dt]}, args, ci=ci))
    return cases


def _sgd_step_cases() -> list[Case]:
    cases = []
    for dt, momentum, nesterov, first, misaligned in ((F32, 0.9, False, False, False), (F32, 0.9, True, False, True),
                                                      (F32, 0.0, False, False, False), (F32, 0.9, False, True, False),
                                                      (BF16, 0.9, True, False, False)):
        def args(dt=dt, momentum=momentum, nesterov=nesterov, first=first, misaligned=misaligned):
            params, grads, bufs = _lists((dt,) * 3, _SIZES, misaligned)
            anchors, omegas = _lists((dt, F32), _SIZES, misaligned)
            return (params, grads, bufs if momentum else [], anchors, omegas, 0.5, 1e-2, 1e-4, momentum, 0.0,
                    nesterov, False, first)
        label = ", ".join(["a misaligned view" if misaligned else "aligned"]
                          + ([f"momentum{', nesterov' if nesterov else ''}{', first step' if first else ''}"]
                             if momentum else ["no momentum"]))
        ci = (dt, momentum, nesterov, first, misaligned) in ((F32, 0.9, False, False, False),
                                                             (F32, 0.9, True, False, True))
        cases.append(Case(label, {"params": SHORT[dt]}, args, ci=ci))
    return cases


def _abs_bmm_cases() -> list[Case]:
    # The launcher itself (abs_bmm_triton sends T = 1 to abs_outer, audited above), with the
    # budget a call gets by default and ``programs`` as on a GPU: 1 (a CPU tensor would get 4)
    # keeps omega's tiles unsplit (ACCUMULATE, omega read and written in place), 132 (an H100's
    # multiprocessors) splits a small omega's samples into fp32 partial sums (ACCUMULATE=False).
    from .ops.abs_bmm import DEFAULT_MEMORY_BUDGET

    cases = []

    def add(label, shape, da, db, *, tf32=False, layout="contiguous", programs=1, ci=False, aligned=True):
        s, t, j, i = shape

        def args():
            # a (S, T, J): contiguous as a Linear's output gradients, or T-contiguous as the
            # conv rule's (the (N, O, L) gradients transposed to (N, L, O)); b (S, T, I) contiguous.
            a = _zeros(s, t, j, dtype=da) if layout == "contiguous" else _zeros(s, j, t, dtype=da).transpose(1, 2)
            return _zeros(j, i), a, _zeros(s, t, i, dtype=db), 0.5, DEFAULT_MEMORY_BUDGET, programs
        text = (f"{label} S,T,J,I={s},{t},{j},{i}" + ("" if layout == "contiguous" else f"; a {layout}")
                + (f"; programs={programs}" if programs != 1 else "") + ("; allow_tf32" if tf32 else ""))
        cases.append(Case(text, {"a": SHORT[da], "b": SHORT[db]}, args, allow_tf32=tf32, ci=ci,
                          expect=("vector_io",) if aligned else ()))

    # A sequence Linear layer's (batch, positions, outputs, inputs), every dim a multiple of 16,
    # then the same with J = 13 (a head with an odd number of outputs): every dtype pair, both
    # orders (the launcher swaps a and b when only a is fp32), TF32 off and on for fp32 inputs.
    for (da, db), tf32 in itertools.product(itertools.product(DTYPES, DTYPES), (False, True)):
        if tf32 and F32 not in (da, db):
            continue  # allow_tf32 only changes fp32 inputs
        # CI: the swapped mixed pair (the launcher's swap; fp32 FMA products with a 16-bit
        # operand converted in registers) and fp32 under TF32 (its tiles pass through registers
        # for 16-byte loads); the 16-bit tensor-core rule is the split case below.
        ci = (da, db) == (F32, BF16) and not tf32 or (da, db) == (F32, F32) and tf32
        add("aligned", (8, 128, 512, 768), da, db, tf32=tf32, ci=ci)
        add("odd J", (8, 128, 13, 768), da, db, tf32=tf32, aligned=False)
    # The conv rule's layout: fp32 (it converts), T = L output positions, a T-contiguous.
    for tf32 in (False, True):
        add("conv", (8, 1024, 64, 576), F32, F32, tf32=tf32, layout="T-contiguous")
    # Split over samples: omega has 2 tiles of 128 x 128 for 132 multiprocessors.
    for da, db in ((F16, F16), (BF16, F16), (F32, F32)):
        add("split", (32, 64, 128, 256), da, db, programs=132, ci=(da, db) == (F16, F16))
    return cases


ENTRIES: list[Entry] = [
    Entry("abs_outer_accumulate_", "mas_kernels.ops.triton.abs_outer:abs_outer_triton", _abs_outer_cases,
          scalars=("alpha",), tensor_cores=True),
    Entry("abs_accumulate_", "mas_kernels.ops.triton.multi_tensor:abs_accumulate_triton", _abs_accumulate_cases,
          scalars=("alpha",), chunked=True),
    Entry("penalty_grad_", "mas_kernels.ops.triton.multi_tensor:penalty_grad_triton", _penalty_cases,
          scalars=("two_lam",), chunked=True),
    Entry("abs_bmm_accumulate_", "mas_kernels.ops.triton.abs_bmm:launch", _abs_bmm_cases,
          scalars=("alpha",), tensor_cores=True),
    Entry("adam_penalty_step_", "mas_kernels.ops.triton.optim_step:adam_penalty_step_triton", _adam_step_cases,
          scalars=("two_lam", "grad_sign", "decay", "wd_coupled", "lerp_w", "beta2", "one_minus_beta2",
                   "neg_step_size", "bc2_sqrt", "eps"), chunked=True),
    Entry("sgd_penalty_step_", "mas_kernels.ops.triton.optim_step:sgd_penalty_step_triton", _sgd_step_cases,
          scalars=("two_lam", "grad_sign", "wd", "momentum", "one_minus_dampening", "neg_lr"), chunked=True),
]


# ------------------------------------------------------------ launch capture
@dataclasses.dataclass
class Launch:
    fn: Any                      # the JITFunction
    args: tuple
    kwargs: dict
    configs: list | None         # autotune configs the launch chooses among (None: not autotuned)
    key: tuple = ()              # the autotuner's key (its cache of best configs is per key value)


class _Captured(Exception):
    pass


def capture(call: Callable[[], Any]) -> list[Launch]:
    """Run ``call`` with every Triton kernel launch recorded instead of executed."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, None))

    def record_tune(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        fn = self.fn
        if not isinstance(fn, JITFunction):
            raise TypeError(f"audit: autotuned {type(fn).__name__} (heuristics?) is not supported; wrap the JITFunction")
        configs = list(self.configs)
        if getattr(self, "early_config_prune", None):
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs)
        launches.append(Launch(fn, args, kwargs, configs, tuple(self.keys)))

    JITFunction.run, Autotuner.run = record_jit, record_tune
    try:
        call()
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run
    return launches


# ------------------------------------------------------------------- compiles
@dataclasses.dataclass
class Job:
    op: str
    case: Case
    chunked: bool
    scalars: tuple[str, ...]
    expect: tuple[str, ...]
    fn: Any
    arch: int
    config: dict
    key: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _bind(fn, args, kwargs, arch):
    """What ``JITFunction.run`` would compile for ``args`` on ``arch``: Triton's own binder and packing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _config_dict(kwargs: dict) -> dict:
    keep = {}
    for k, v in kwargs.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            keep[k] = v
        else:
            keep[k] = str(v)
    return keep


def plan(entries=None, archs=ARCHS, ci=False) -> list[Job]:
    """Every compile the audit will do: launches of each case x autotune configs x archs."""
    jobs = []
    for entry in entries or ENTRIES:
        module, _, name = entry.launcher.partition(":")
        launcher = getattr(__import__(module, fromlist=[name]), name)
        for case in entry.cases():
            if ci and not case.ci:
                continue
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = case.allow_tf32
            try:
                launches = capture(lambda: launcher(*case.args()))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            for launch in launches:
                for cfg in launch.configs or [None]:
                    kwargs = dict(launch.kwargs)
                    if cfg is not None:
                        kwargs.update(cfg.all_kwargs())
                    shown = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
                    for arch in archs:
                        sig, cx, attrs, options = _bind(launch.fn, launch.args, kwargs, arch)
                        expect = tuple(case.expect)
                        if entry.tensor_cores and all(_is16(d) for d in case.dtypes.values()):
                            expect += ("tensor_cores",)
                        jobs.append(Job(entry.op, case, entry.chunked, entry.scalars, expect, launch.fn, arch,
                                        _config_dict(shown), launch.key, sig, cx, attrs, options))
    return jobs


_JOBS: list[Job] = []


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself runs for ``arch`` (triton 3.9 uses its newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_stats(ptx: str, arch: int, log: str) -> dict:
    """Registers, spills and stack from ``ptxas -v``: Triton's own run (``log``), else a run of the same ptxas.

    The audit compiles with Triton's cache bypassed, so the log is there; the
    fallback (ptxas without Triton's flags) is for a Triton that does not print it.
    """
    if "Used" not in log:  # ptxas's log was not printed
        gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True, check=True)
        log = out.stdout + out.stderr
    stats = {k: sum(int(x) for x in r.findall(log)) for k, r in _PTXAS_RE.items()}
    stats["registers"] = max((int(x) for x in _PTXAS_RE["registers"].findall(log)), default=0)
    return stats


# TTGIR: ops that touch global memory, their operands and type, and their location.
_TTGIR_ACCESS = re.compile(
    r"(tt\.load|tt\.store|ttg\.async_copy_global_to_local|tt\.atomic_rmw|tt\.atomic_cas)\s+(.*?)\s*:\s*(.*?)\s+loc\((.*?)\)\s*$")
_LOC_DEF = re.compile(r"^#(loc\d*)\s*=\s*loc\((.*)\)\s*$")


def _resolve_loc(text: str, defs: dict[str, str], depth: int = 0):
    """``(file, line, col)`` of an MLIR location (the callee's position for inlined code)."""
    text = text.strip()
    if depth > 50:
        return None
    m = re.match(r'^"([^"]+)":(\d+):(\d+)', text)
    if m:
        return m.group(1), int(m.group(2)), int(m.group(3))
    m = re.match(r"^#(loc\d*)$", text)
    if m:
        return _resolve_loc(defs.get(m.group(1), "unknown"), defs, depth + 1)
    m = re.match(r'^"[^"]*"\((.*)\)$', text)  # a name location: loc("x"(#loc3))
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    m = re.match(r"^callsite\((#loc\d*|.*?) at ", text)
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    m = re.match(r"^fused\[(#loc\d*|[^,\]]*)", text)
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    return None


def _ttgir_accesses(ttgir: str) -> dict[tuple, dict]:
    """Source position -> {"tensor": bool, "masked": bool, "op": str} of each global access in the TTGIR."""
    defs = {}
    for line in ttgir.splitlines():
        m = _LOC_DEF.match(line.strip())
        if m:
            defs[m.group(1)] = m.group(2)
    found = {}
    for line in ttgir.splitlines():
        m = _TTGIR_ACCESS.search(re.sub(r"\{[^{}]*\}", "", line))  # attribute dicts hold ':' too
        if not m:
            continue
        op, operands, types, loc = m.groups()
        where = _resolve_loc(loc, defs)
        if where is None:
            continue
        operands = re.sub(r"\{.*\}", "", operands)
        n_ops = len([o for o in operands.split(",") if o.strip().startswith("%")])
        if op == "ttg.async_copy_global_to_local":
            masked = " mask " in f" {operands} "
        else:
            masked = n_ops > (1 if op == "tt.load" else 2)
        found[where] = {"tensor": "tensor<" in types, "masked": masked, "op": op}
    return found


_PTX_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global|st\.global|cp\.async(?:\.\w+)*?\.shared(?:::\w+)?\.global)"
                         r"([.\w:]*)\s*(.*)$")
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"(?:\s*,\s*\d+\s*,\s*\d+)?\s*(?:"([^"]+)")?')
_WIDTH = re.compile(r"\.(?:b|u|s|f)(\d+)\b")


def _access_bits(kind: str, suffix: str, rest: str) -> int:
    if kind.startswith("cp.async"):
        # cp.async.{ca,cg}.shared.global [dst], [src], cp-size[, src-size]: bytes copied
        sizes = re.findall(r"\]\s*,\s*(?:0x)?([0-9a-fA-F]+)", rest)
        m = re.search(r"\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", rest)
        return int(m.group(1), 0) * 8 if m else (int(sizes[0], 0) * 8 if sizes else 0)
    vec = re.search(r"\.v(\d+)", suffix)
    width = _WIDTH.findall(suffix)
    return (int(vec.group(1)) if vec else 1) * (int(width[-1]) if width else 0)


def _ptx_accesses(ptx: str) -> list[dict]:
    """Every global access of the PTX: kind, width in bits, and the source position before it."""
    files = {}
    for line in ptx.splitlines():
        m = _PTX_FILE.match(line)
        if m:
            files[m.group(1)] = os.path.join(m.group(2), m.group(3)) if m.group(3) else m.group(2)
    where, out, in_asm = None, [], False
    for line in ptx.splitlines():
        # Triton emits memory accesses as inline asm, inside which LLVM numbers the
        # .loc lines from the asm statement's own line on: keep the statement's.
        if "// begin inline asm" in line:
            in_asm = True
            continue
        if "// end inline asm" in line:
            in_asm = False
            continue
        m = _PTX_LOC.match(line)
        if m:
            if not in_asm:
                where = (files.get(m.group(1), m.group(1)), int(m.group(2)), int(m.group(3)))
            continue
        m = _PTX_ACCESS.match(line)
        if m:
            kind, suffix, rest = m.groups()
            out.append({"kind": "store" if kind.startswith("st") else "load",
                        "bits": _access_bits(kind, suffix, rest), "where": where,
                        "async": kind.startswith("cp.async")})
    return out


def _bits(xs) -> list[int] | None:
    xs = [x["bits"] for x in xs]
    return [min(xs), max(xs)] if xs else None


def _source(where) -> str:
    if where is None:
        return "?"
    text = linecache.getline(where[0], where[1]).strip()
    return f"{os.path.basename(where[0])}:{where[1]} {text[:70]}"


def _analyse(job: Job, kernel) -> dict:
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    tt = _ttgir_accesses(ttgir)
    by_line = {(f, l): v for (f, l, _), v in tt.items()}
    data, scalar = [], []
    for acc in _ptx_accesses(ptx):
        info = tt.get(acc["where"]) if acc["where"] else None
        if info is None and acc["where"]:
            info = by_line.get(acc["where"][:2])
        if acc["async"] or (info is not None and info["tensor"]):
            acc["masked"] = True if info is None else info["masked"]
            data.append(acc)
        else:
            scalar.append(acc)
    rec: dict[str, Any] = {}
    if job.chunked:
        full = [a for a in data if not a["masked"]]
        tail = [a for a in data if a["masked"]]
        rec["full_chunk_path"] = bool(full)
        shown = full if full else tail
        rec["load_bits"] = _bits(a for a in shown if a["kind"] == "load")
        rec["store_bits"] = _bits(a for a in shown if a["kind"] == "store")
        rec["tail_load_bits"] = _bits(a for a in tail if a["kind"] == "load")
        rec["tail_store_bits"] = _bits(a for a in tail if a["kind"] == "store")
    else:
        rec["full_chunk_path"] = None
        rec["load_bits"] = _bits(a for a in data if a["kind"] == "load")
        rec["store_bits"] = _bits(a for a in data if a["kind"] == "store")
    per_line: dict[str, list] = {}
    for a in data:
        per_line.setdefault(_source(a["where"]), []).append(a["bits"])
    rec["data_accesses"] = {k: [min(v), max(v), len(v)] for k, v in sorted(per_line.items())}
    rec["scalar_accesses"] = len(scalar)
    mma = re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)[.\w]*)", ptx)
    rec["mma"] = max(set(mma), key=mma.count) if mma else None
    rec["fma_f32"] = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
    rec["ptx_lines"] = ptx.count("\n")
    return rec


def _compile(i: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[i]
    rec: dict[str, Any] = {
        "op": job.op, "kernel": job.fn.__name__, "arch": job.arch, "triton": triton.__version__,
        "dtypes": job.case.dtypes, "case": job.case.label, "allow_tf32": job.case.allow_tf32,
        "config": job.config, "autotune_key": list(job.key), "ci": job.case.ci, "expect": list(job.expect),
        "smem_limit": SMEM_LIMIT[job.arch],
    }
    # Step-varying scalars: runtime arguments (a float type in the signature), never constexpr.
    rec["scalar_args"] = {name: job.signature.get(name) for name in job.scalars}
    rec["scalars_runtime"] = all(t not in (None, "constexpr") for t in rec["scalar_args"].values())
    started = time.perf_counter()
    try:
        src = ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        # Triton prints ptxas's -v log when asked: registers and spills of the very cubin it built.
        # Never from Triton's cache: a cached kernel has no log, and ptxas run again here
        # without Triton's own flags (-lineinfo, --regAllocOptLevel on triton 3.9) allocates
        # registers differently (an 8-byte spill or not, for the same PTX).
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        rec.update(_ptxas_stats(kernel.asm["ptx"], job.arch, log.getvalue()))
        rec["spill_bytes"] = rec.pop("spill_stores") + rec.pop("spill_loads")
        rec["smem_bytes"] = int(kernel.metadata.shared)
        rec.update(_analyse(job, kernel))
        rec["compiled"], rec["error"] = True, None
    except Exception as e:  # a failed compile is a finding, reported in its record
        rec.update(compiled=False, error=f"{type(e).__name__}: {str(e).strip()[:500]}", registers=None,
                   spill_bytes=None, smem_bytes=None, full_chunk_path=None, load_bits=None, store_bits=None,
                   mma=None)
    rec["compile_s"] = round(time.perf_counter() - started, 2)
    return rec


def run(entries=None, archs=ARCHS, ci=False, jobs: int | None = None, progress=None) -> list[dict]:
    """Compile everything :func:`plan` lists; one record per compile (see the module docstring)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("mas_kernels.audit: unset TRITON_INTERPRET (the audit compiles for real GPU targets)")
    global _JOBS
    _JOBS = plan(entries, archs, ci)
    n = len(_JOBS)
    jobs = jobs or min(os.cpu_count() or 1, 8)
    records: list[dict] = [None] * n  # type: ignore[list-item]
    if jobs <= 1:
        for i in range(n):
            records[i] = _compile(i)
            if progress:
                progress(i + 1, n, records[i])
        return records
    # fork: the workers inherit the planned jobs (JIT functions do not pickle).
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(_compile, i): i for i in range(n)}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            records[futures[fut]] = fut.result()
            if progress:
                progress(done, n, records[futures[fut]])
    return records


# --------------------------------------------------------------------- checks
def _is16(dt: str) -> bool:
    return dt in ("f16", "bf16")


def check(rec: dict) -> list[str]:
    """What is wrong with one compile (an empty list when it is clean)."""
    bad = []
    if not rec["compiled"]:
        return [f"does not compile: {rec['error']}"]
    if rec["spill_bytes"]:
        bad.append(f"spills {rec['spill_bytes']} bytes")
    if rec["smem_bytes"] > rec["smem_limit"]:
        bad.append(f"needs {rec['smem_bytes']} bytes of shared memory, over the sm_{rec['arch']} limit {rec['smem_limit']}")
    if not rec["scalars_runtime"]:
        bad.append(f"a step-varying scalar is not a runtime argument: {rec['scalar_args']}")
    if rec["full_chunk_path"] is True:
        for kind in ("load_bits", "store_bits"):
            if rec[kind] is not None and rec[kind][0] < 128:
                bad.append(f"full-chunk path has {rec[kind][0]}-bit accesses ({kind}={rec[kind]})")
    if "tensor_cores" in rec.get("expect", ()) and not rec["mma"]:
        bad.append("16-bit inputs without tensor-core instructions")
    if "vector_io" in rec.get("expect", ()):
        for kind in ("load_bits", "store_bits"):
            if rec[kind] is not None and rec[kind][0] < 128:
                bad.append(f"{kind}={rec[kind]}: not every global access is 128 bits on an aligned shape")
    return bad


def _variant(rec: dict) -> str:
    """The compile-time choices of a record other than tile sizes and dtypes (e.g. a precision rule)."""
    keep = [f"{k}={v}" for k, v in rec["config"].items()
            if k.isupper() and not k.startswith("BLOCK") and not k.endswith("DTYPE")]
    if rec.get("full_chunk_path") is not None:
        keep.append("full chunks" if rec["full_chunk_path"] else "masked only")
    return ", ".join(keep) or "-"


def _tile(cfg: dict) -> str:
    blocks = "x".join(str(v) for k, v in cfg.items() if k.startswith("BLOCK"))
    return f"{blocks} w{cfg.get('num_warps', '?')} s{cfg.get('num_stages', '-')}"


def _span(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"


def summary(records: list[dict]) -> str:
    """A short text report: totals, one line per (op, variant, arch, config), then every problem found."""
    lines = []
    ok = [r for r in records if not check(r)]
    compiled = [r for r in records if r["compiled"]]
    versions = sorted({r["triton"] for r in records})
    lines.append(f"mas_kernels compile audit: triton {', '.join(versions)}, torch {torch.__version__}; "
                 f"{len(records)} compiles, {len(compiled)} compiled, {len(ok)} clean")
    spills = sum(1 for r in compiled if r["spill_bytes"])
    over = sum(1 for r in compiled if r["smem_bytes"] > r["smem_limit"])
    full = [r for r in compiled if r["full_chunk_path"]]
    full128 = sum(1 for r in full if r["load_bits"] and r["load_bits"][0] >= 128 and r["store_bits"][0] >= 128)
    mm16 = [r for r in compiled if "tensor_cores" in r.get("expect", ())]
    lines.append(f"  spilling compiles: {spills}; over the shared-memory limit: {over}; "
                 f"full-chunk paths with 128-bit loads and stores: {full128}/{len(full)}; "
                 f"16-bit matmul compiles with tensor cores: {sum(1 for r in mm16 if r['mma'])}/{len(mm16)}")
    lines.append("  one line per (op, variant, arch, config) over every dtype combination and case; load/store bits:")
    lines.append("  [narrowest, widest] global data access (the full-chunk path where there is one) over the aligned")
    lines.append("  cases; the per-compile records, with each source line's widths, are in the JSON")
    lines.append("")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["op"], _variant(r), r["arch"], _tile(r["config"])), []).append(r)
    vw = max([34] + [len(v) for _, v, _, _ in groups])  # the variant column: abs_bmm's are 44 wide
    head = (f"{'op':<22} {'variant':<{vw}} {'arch':<5} {'config':<20} {'n':>3} {'dtypes':<16} {'regs':>7} {'spill':>5} "
            f"{'smem KiB':>8} {'load bits':>10} {'store bits':>10}  mma")
    lines.append(head)
    lines.append("-" * len(head))
    for (op, variant, arch, tile), rs in groups.items():
        good = [r for r in rs if r["compiled"]]
        aligned = [r for r in good if "vector_io" in r.get("expect", ()) or r["full_chunk_path"] is not None]
        dts = sorted({"/".join(r["dtypes"].values()) for r in rs})
        dt = dts[0] if len(dts) == 1 else f"{len(dts)} combinations"
        lb = [b for r in aligned if r["load_bits"] for b in r["load_bits"]]
        sb = [b for r in aligned if r["store_bits"] for b in r["store_bits"]]
        mma = sorted({(r["mma"] or "-").replace("mma_async.sync.aligned.", "").replace("mma.sync.aligned.", "mma.")
                      for r in good})
        smem = [r["smem_bytes"] / 1024 for r in good]
        lines.append(
            f"{op:<22} {variant:<{vw}} sm{arch:<3} {tile:<20} {len(rs):>3} {dt[:16]:<16} "
            f"{_span([r['registers'] for r in good]):>7} {max([r['spill_bytes'] for r in good], default=0):>5} "
            f"{(f'{max(smem):.0f}' if smem else '-'):>8} {f'[{min(lb)}, {max(lb)}]' if lb else '-':>10} "
            f"{f'[{min(sb)}, {max(sb)}]' if sb else '-':>10}  {', '.join(mma)}")
    problems = [(r, check(r)) for r in records if check(r)]
    lines.append("")
    lines.append(f"problems: {len(problems)}")
    for r, bad in problems:
        lines.append(f"  {r['op']} sm_{r['arch']} {r['dtypes']} {r['case']} {_tile(r['config'])} {_variant(r)}: "
                     + "; ".join(bad))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mas_kernels.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the records to this JSON file")
    p.add_argument("--summary", help="write the text summary to this file (also printed)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SMEM_LIMIT))
    p.add_argument("--ci", action="store_true", help="only the representative subset CI compiles")
    p.add_argument("--op", nargs="+", help="only these ops (names in ENTRIES)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count, at most 8)")
    p.add_argument("--quiet", action="store_true")
    ns = p.parse_args(argv)
    # Triton 3.9 warns that its default (fp fusion on) will change; audit with today's default, quietly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    entries = [e for e in ENTRIES if not ns.op or e.op in ns.op]
    started = time.perf_counter()

    def progress(done, n, rec):
        if not ns.quiet:
            print(f"\r{done}/{n} compiled", end="", file=sys.stderr, flush=True)

    records = run(entries, tuple(ns.arch), ns.ci, ns.jobs, progress)
    if not ns.quiet:
        print(f"\r{len(records)} compiles in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = summary(records)
    print(text, end="")
    if ns.summary:
        with open(ns.summary, "w") as f:
            f.write(text)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return 0 if all(not check(r) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
