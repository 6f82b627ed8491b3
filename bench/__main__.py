"""``python -m bench [--quick] [--json PATH] [--plot PATH] [--txt PATH]`` (from the repository root): every case of
:func:`bench.cases.plan` timed side by side, then the table."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import __doc__ as _package_doc
from . import cases, harness, report


class _Console:
    """Prints, and keeps a copy of what it printed for ``--txt`` (progress lines go to stderr, as before)."""

    def __init__(self):
        self.lines: list[str] = []

    def say(self, text: str = "", err: bool = False) -> None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
        self.lines.append(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=_package_doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds, no torch.compile (< 1 min)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine description as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a throughput-vs-size plot (PNG)")
    parser.add_argument("--txt", metavar="PATH", help="write everything printed (progress lines and table) to PATH")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help=f"comma-separated subset of: {','.join(cases.SECTIONS)}")
    parser.add_argument("--models", metavar="KINDS",
                        help="comma-separated subset of the importance/selfcheck rows' models (bench/models.py KINDS)")
    parser.add_argument("--reps", type=int, help="at most this many timed rounds per implementation, as many as "
                        "fit in ~2 s (0.5 s with --quick) (default 20 with --quick, else 200)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: the process's CPU time, robust to other jobs on a "
                        "shared machine with OMP_NUM_THREADS=1 (with more threads it counts their spin-waiting)")
    args = parser.parse_args(argv)
    sections = set(args.only.split(",")) if args.only else None
    if sections is not None and not sections <= set(cases.SECTIONS):
        parser.error(f"--only: unknown section(s) {', '.join(sorted(sections - set(cases.SECTIONS)))} "
                     f"(choose from {','.join(cases.SECTIONS)})")

    device = torch.device(args.device)
    if args.timer == "cpu":
        harness.TIMER = time.process_time
    reps = args.reps or (20 if args.quick else 200)
    use_compile = not args.quick and not args.no_compile
    info = harness.machine_info(device)
    info["timer"] = args.timer
    info["ours_backend"] = harness.ours_backend(device)
    info["package"] = harness.package_origin()
    out = _Console()
    for line in report.header(info, harness.native_error()):
        out.say(line)
    t_start = time.perf_counter()
    rows: list[dict] = []
    failed = 0
    try:
        models = {"models": args.models.split(",")} if args.models else {}
        for section, build in cases.plan(args.quick, device, use_compile, **models):
            if sections is not None and section not in sections:
                continue
            t0 = time.perf_counter()
            try:
                case = build()
                case_rows = harness.run_case(case, device, reps, info, args.quick)
                if case.op == "optim_step":  # the target: the penalty in the step adds <= half the separate pass
                    added = cases.added_fraction(case_rows)
                    case.notes["added vs separate"] = None if added is None else round(added, 3)
                    for r in case_rows:
                        r.setdefault("notes", {})["added vs separate"] = case.notes["added vs separate"]
                rows.extend(case_rows)
            except ModuleNotFoundError as exc:
                out.say(f"  skipped {_label(section, build)}: {missing_extra(exc)}", err=True)
                continue
            except Exception as exc:  # noqa: BLE001 - one case's failure must not lose the others' rows
                failed += 1
                out.say(f"  FAILED {_label(section, build)}: {type(exc).__name__}: {exc}", err=True)
                continue
            out.say(report.case_line(case, time.perf_counter() - t0), err=True)
            del case
            _write(args, out, info, rows, t_start, partial=True)
    finally:  # also on Ctrl-C or a crash: the rows measured so far are kept
        _write(args, out, info, rows, t_start, partial=False)
    return 1 if failed else 0


# The extra (pyproject.toml) that brings each optional module a case may import.
EXTRAS = {"transformers": "transformers", "accelerate": "transformers", "lightning": "lightning",
          "pytorch_lightning": "lightning", "avalanche": "avalanche", "matplotlib": "bench",
          "triton": "triton"}


def missing_extra(exc: ModuleNotFoundError) -> str:
    """``"needs transformers (pip install 'mas_kernels[transformers]')"`` for a missing module."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    return f"needs {top or exc}" + (f" (pip install 'mas_kernels[{extra}]')" if extra else "")


def _label(section: str, build) -> str:
    """The section and the builder's arguments (the plan binds them as lambda defaults)."""
    bound = [str(v) for v in (getattr(build, "__defaults__", None) or ()) if isinstance(v, (str, int, float))]
    return " ".join([section, *bound])


def _write(args, out: _Console, info: dict, rows: list[dict], t_start: float, partial: bool) -> None:
    """The JSON after every case (``partial``); at the end also the table, the text and the plot."""
    info["loadavg_end"] = harness.loadavg()
    info["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        tmp = f"{args.json}.tmp"
        report.write_json(tmp, info, args.quick, args.reps or (20 if args.quick else 200), rows)
        os.replace(tmp, args.json)
    if partial:
        return
    out.say()
    out.say(report.format_table(rows))
    out.say(f"\n{len(rows)} rows in {info['total_seconds']} s; load average at the end {info['loadavg_end']}")
    if args.json:
        out.say(f"wrote {args.json}")
    if args.txt:
        os.makedirs(os.path.dirname(os.path.abspath(args.txt)), exist_ok=True)
        with open(args.txt, "w") as f:
            f.write("\n".join(out.lines) + "\n")
        print(f"wrote {args.txt}")
    if args.plot and rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        try:
            report.plot(rows, info, args.plot)
            out.say(f"wrote {args.plot}")
        except ModuleNotFoundError as exc:
            out.say(f"no plot: {missing_extra(exc)}")


if __name__ == "__main__":
    sys.exit(main())
