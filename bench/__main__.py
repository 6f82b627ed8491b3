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
    parser.add_argument("--reps", type=int, help="at most this many timed rounds per implementation, as many as "
                        "fit in ~2 s (1 s with --quick) (default 20 with --quick, else 200)")
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
    out = _Console()
    for line in report.header(info, harness.native_error()):
        out.say(line)
    t_start = time.perf_counter()
    rows: list[dict] = []
    for section, build in cases.plan(args.quick, device, use_compile):
        if sections is not None and section not in sections:
            continue
        case = build()
        t0 = time.perf_counter()
        rows.extend(harness.run_case(case, device, reps, info, args.quick))
        out.say(report.case_line(case, time.perf_counter() - t0), err=True)
        del case
    info["loadavg_end"] = harness.loadavg()
    info["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out.say()
    out.say(report.format_table(rows))
    out.say(f"\n{len(rows)} rows in {info['total_seconds']} s; load average at the end {info['loadavg_end']}")
    if args.json:
        report.write_json(args.json, info, args.quick, reps, rows)
        out.say(f"wrote {args.json}")
    if args.txt:
        os.makedirs(os.path.dirname(os.path.abspath(args.txt)), exist_ok=True)
        with open(args.txt, "w") as f:
            f.write("\n".join(out.lines) + "\n")
        print(f"wrote {args.txt}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        report.plot(rows, info, args.plot)
        out.say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
