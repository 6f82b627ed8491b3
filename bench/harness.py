"""The timing harness: what a case is, how it is timed, the statistics, and the machine that ran it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

from mas_kernels import _backend, _native


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
    info["loadavg_start"] = loadavg()
    return info


def loadavg() -> str | None:
    """The 1, 5 and 15 minute load averages, or None where ``/proc/loadavg`` is missing."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def device_label(info: dict) -> str:
    if "gpu" in info:
        return info["gpu"]
    return f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} threads)"


def native_error() -> str:
    """Why the native CPU kernels are not loaded (``""`` when they are)."""
    return _native.load_error()


def package_origin() -> dict:
    """Which mas_kernels is measured: ``path``, ``where`` (``installed`` or ``source tree``) and ``shadows``
    (the installed copy the source tree hides when the bench runs from the repository root)."""
    package = _backend.info().package
    installed = os.sep + "site-packages" + os.sep in package["path"] + os.sep
    return {**package, "where": "installed" if installed else "source tree"}


def ours_backend(device: torch.device) -> str:
    """What "ours" runs on ``device`` under the default backend: native, triton or torch."""
    return _backend.choose(device)


# ----------------------------------------------------------------- timing
#: The clock of :func:`measure`: wall time (``time.perf_counter``), or the process's CPU time
#: (``time.process_time``, ``python -m bench --timer cpu``). On a machine shared with other jobs a single-threaded
#: process's CPU time is the work it did, whatever the load (its wall time is stretched by the time slices the
#: others get); with several threads it also counts the OpenMP team's spin-waiting, so use it with one thread.
TIMER = time.perf_counter


def sync(device: torch.device) -> None:
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
            sync(device)
            t0 = TIMER()
            impls[name]()
            sync(device)
            single[name] = TIMER() - t0
    want = {n: max(3, min(reps, int(budget_s / max(single[n], 1e-9)))) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(want.values())):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if len(times[name]) >= want[name]:
                continue
            sync(device)
            t0 = TIMER()
            impls[name]()
            sync(device)
            times[name].append(TIMER() - t0)
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


def run_case(case: Case, device: torch.device, reps: int, info: dict, quick: bool = False) -> list[dict]:
    """Time ``case``'s implementations side by side; one row (a dict) per implementation."""
    times = measure(case.impls, device, reps, warmup=1 if quick else 2, budget_s=0.5 if quick else 2.0)
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
            "is_baseline": impl == case.baseline,
        }
        if case.notes:
            row["notes"] = dict(case.notes)
        rows.append(row)
    return rows


@contextlib.contextmanager
def _kineto_quiet():
    """Drop the profiler library's per-session progress lines (``USDT: ... profiler_start``, ``STAGE: ...``),
    which it writes straight to file descriptor 2, two or more per measured call; every other line written
    to stderr meanwhile is passed on when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not re.match(r"(USDT|STAGE):\d{4}-", ln)]
            if kept:
                sys.stderr.write("".join(kept))


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (above what was live before) during ``fn()``, from the profiler's memory events.

    On CPU, torch keeps no allocator statistics: the profiler records each
    op's allocations and each free, and their running sum in time order peaks
    at the high-water mark.
    """
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak
