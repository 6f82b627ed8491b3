"""The report: the console header, the fixed-width table, the JSON file and the plot."""

from __future__ import annotations

import json
import math
import os

from .harness import device_label


def header(info: dict, native_error: str = "") -> list[str]:
    """The two lines printed before the cases run: the machine, and how to read the numbers."""
    native = "yes" if info["native_kernels"] else f"no ({native_error})"
    package = info.get("package")
    lines = [
        f"mas_kernels bench on {device_label(info)}; torch {info['torch']}; native CPU kernels: {native}; "
        f"load average {info['loadavg_start']}",
    ]
    if package:
        lines.append(f"measuring mas_kernels from {package['path']} ({package['where']})")
        if package["shadows"]:
            lines.append(f"note: this source tree hides the installed mas_kernels at {package['shadows']}, which is "
                         "not measured (pip install -e . makes them one)")
    return lines + [
        f"'ours' = the mas_kernels op with the default backend, here {info['ours_backend']}; "
        f"{'process CPU time' if info.get('timer') == 'cpu' else 'wall time'}; times are medians [20%, 80% quantiles]; x bound, x baseline: medians of the per-round ratios "
        "(each round runs every implementation back to back), or ratios of medians where one side had fewer "
        "rounds",
    ]


def case_line(case, seconds: float) -> str:
    """The progress line of one case: what ran, how long, and its notes (compile time, skipped rows)."""
    note = f"  [{'; '.join(f'{k}: {v}' for k, v in case.notes.items())}]" if case.notes else ""
    return f"  {case.op} {case.dtype} {case.size}: {seconds:.1f} s{note}"


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
        elif r["op"] in ("train_step", "inference", "optim_step"):
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


# The panels of ratio rows (no throughput): each a bar per implementation against its case's baseline.
_RATIO_PANELS = (
    ("end to end: training step (blue), inference (orange), vs plain", ("train_step", "inference")),
    ("importance per batch, vs a plain forward+backward", ("importance",)),
    ("integrations: one epoch / importance pass, vs the framework alone",
     ("avalanche_epoch", "avalanche_importance", "transformers_epoch", "lightning_epoch")),
)


def plot(rows: list[dict], info: dict, path: str) -> None:
    """Throughput against size per implementation (the bound as a dashed line) for the ops that have a
    throughput; each other row as a bar, its time over its case's baseline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys((r["op"], r["dtype"]) for r in rows if "bytes" in r or "flops" in r))
    panels = [(title, [r for r in rows if r["op"] in ops and r["ratio_to_baseline"] is not None
                       and not r.get("is_baseline")]) for title, ops in _RATIO_PANELS]
    known = {op for _, ops in _RATIO_PANELS for op in ops}
    panels.append(("other, vs their baselines", [r for r in rows if r["op"] not in known and "bytes" not in r
                                                 and "flops" not in r and r["ratio_to_baseline"] is not None
                                                 and not r.get("is_baseline")]))
    panels = [(title, bars) for title, bars in panels if bars]
    n_plots = len(sweeps) + len(panels)
    cols = 3
    rows_n = max(1, math.ceil(n_plots / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (op, dtype) in zip(axes.flat, sweeps):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
        unit = "bytes" if "bytes" in sel[0] else "flops"
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["n"], r[unit] / r["seconds"] / 1e9) for r in sel if r["impl"] == impl)
            xs, ys = zip(*pts)
            if any(r["impl"] == impl and r["is_bound"] for r in sel):
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
    for ax, (title, bars) in zip(list(axes.flat)[len(sweeps):], panels):
        ops = list(dict.fromkeys(r["op"] for r in bars))
        ax.barh(range(len(bars)), [r["ratio_to_baseline"] for r in bars],
                color=[f"C{ops.index(r['op'])}" for r in bars])
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([f"{r['size'].split(' (')[0]}: {r['impl']}" for r in bars], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set_xlabel("time / baseline's time (medians of per-round ratios)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[n_plots:]:
        ax.axis("off")
    fig.suptitle(f"mas_kernels bench on {device_label(info)}, torch {info['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str, info: dict, quick: bool, reps: int, rows: list[dict]) -> None:
    """The rows and the machine description, as ``{"machine", "quick", "reps", "rows"}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, "quick": quick, "reps": reps, "rows": rows}, f, indent=1)
