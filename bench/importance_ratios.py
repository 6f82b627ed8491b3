"""``python -m bench.importance_ratios KINDS [--threads T] [--timer wall|cpu] [--tag TAG] [--budget S] [--batches K]``: the
importance rows of the given models (``bench.models.KINDS``, comma-separated) as JSON lines of per-round ratios
(exact / global_batch, exact / plain forward+backward, ...), for before/after comparisons: run it alternately
with two trees on ``PYTHONPATH`` (each in its own process), e.g.::

    for run in 1 2; do for tree in ../base .; do
      OMP_NUM_THREADS=1 PYTHONPATH=$tree python -m bench.importance_ratios cnn-small,lstm --timer cpu --tag $tree
    done; done

(``../base``: a checkout of the commit before, with its native build and this tree's ``bench/models.py`` and
``bench/harness.py`` copied in, so both time the same models with the same clock)."""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

from . import cases, harness


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.importance_ratios")
    p.add_argument("kinds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    p.add_argument("--tag", default="")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per implementation")
    p.add_argument("--batches", type=int, default=1, help="batches back to back per timed call (one estimate() "
                   "over them), as a DataLoader feeds them (default 1: each call between the others')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timer == "cpu":
        harness.TIMER = time.process_time
    dev = torch.device("cpu")
    for kind in args.kinds.split(","):
        kw = {"peers": False} if "peers" in inspect.signature(cases.importance_case).parameters else {}
        if args.batches != 1:
            kw["batches"] = args.batches
        case = cases.importance_case(kind, dev, False, **kw)
        t = harness.measure(case.impls, dev, 200, warmup=2, budget_s=args.budget)
        plain = "plain forward+backward"
        r = lambda a, b: round(harness.ratio(t[a], t[b]), 3)  # noqa: E731
        print(json.dumps(dict(
            tag=args.tag, timer=args.timer, kind=kind, threads=torch.get_num_threads(), load=harness.loadavg(),
            batches=args.batches,
            plain_ms=round(statistics.median(t[plain]) * 1e3, 2), exact_over_plain=r("exact global", plain),
            gb_over_plain=r("global_batch", plain), exact_over_gb=r("exact global", "global_batch"),
            local_over_plain=r("local", plain), reps=len(t["exact global"]), peak_mb=case.notes.get("peak_mb"))),
            flush=True)


if __name__ == "__main__":
    main()
