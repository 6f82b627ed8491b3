"""MAS on FSDP2 shards vs replicated (DDP): peak memory per rank and the penalty's time per step.

    PYTHONPATH=. python bench/fsdp.py [--width 2896] [--layers 6] [--out bench/results/fsdp.txt]

Two gloo ranks on CPU. The model is an MLP of ``layers`` square Linear layers (default ~50M parameters).
Per rank, for each layout (FSDP2 ``fully_shard`` per layer + root; DDP), the peak resident memory above
what was resident before (``peak_rss``: ``RssAnon`` of ``/proc/self/status`` sampled every 0.2 ms by a thread, after
``malloc_trim`` returned freed memory; the profiler's memory events, ``bench.harness.peak_memory``, miss
frees made in gloo's threads and add up to several times the truth here) of:

* the layout's own forward + backward of a batch (no MAS: what FSDP2/DDP themselves allocate);
* ``estimate`` (local and global, 2 batches of 8), ``consolidate``, ``save``;
* one training step's ``add_penalty_grad_`` after ``backward()``;
* ``ShardedPenalty(model, file)`` (rows read by slices) against reading the whole file;

and the time of ``add_penalty_grad_`` per step, sharded vs replicated, in interleaved rounds
(``bench.harness.measure``), as each rank's median and the paired ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2
MB = 1 << 20


def _rss() -> int:
    """Resident anonymous memory (the process's own; file pages a reader maps are the page cache's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss(fn) -> int:
    """Peak resident bytes above the start during ``fn()`` (sampled; freed heap returned to the OS first)."""
    import ctypes
    import threading

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss()
    peak, done = [base], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss()) - base


def model_of(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)])


def run(rank: int, tmp: str, width: int, layers: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    import mas_kernels as mk
    from bench.harness import measure, ratio, summarize
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(8, width, generator=g) for _ in range(2)]
    rows: list[str] = []

    def note(text: str) -> None:
        if rank == 0:
            rows.append(text)
            print(text, flush=True)

    numel = sum(p.numel() for p in model_of(width, 1).parameters()) * layers
    note(f"MLP {layers} x Linear({width}, {width}): {numel / 1e6:.1f}M parameters, {4 * numel / MB:.0f} MB fp32; "
         f"{WORLD} gloo ranks, torch {torch.__version__}")
    steps = {}
    for layout in ("replicated (DDP)", "sharded (FSDP2)"):
        model = model_of(width, layers)
        if layout.startswith("sharded"):
            for block in model:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        else:
            wrapped = DDP(model)
        peaks = {}

        def own_step():
            wrapped(xs[0]).pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        peaks["(the layout's own forward+backward)"] = peak_rss(own_step)
        for rule in ("local", "global"):
            mas = mk.MAS(wrapped, importance=rule)
            peaks[f"estimate ({rule})"] = peak_rss(lambda: mas.estimate(xs))
            peaks[f"consolidate ({rule})"] = peak_rss(mas.consolidate)
        peaks["save"] = peak_rss(lambda: mas.save(Path(tmp) / f"state-{layout[:3]}.safetensors"))
        peaks["state held (Omega + theta*)"] = mas.nbytes
        wrapped(xs[0]).pow(2).mean().backward()
        peaks["add_penalty_grad_ (one step)"] = peak_rss(mas.add_penalty_grad_)
        peaks["ShardedPenalty(model, file)"] = peak_rss(
            lambda: mk.ShardedPenalty(model, Path(tmp) / "state-rep.safetensors"))
        if layout.startswith("sharded"):
            from safetensors.torch import load_file

            peaks["(whole file in memory, as before)"] = peak_rss(
                lambda: {k: v.clone() for k, v in load_file(Path(tmp) / "state-rep.safetensors").items()})
        for what, b in peaks.items():
            mine = torch.tensor([b], dtype=torch.float64)
            every = [torch.zeros_like(mine) for _ in range(WORLD)]
            dist.all_gather(every, mine)
            note(f"  {layout:18s} {what:32s} " + "  ".join(f"rank {r}: {float(t) / MB:7.1f} MB"
                                                             for r, t in enumerate(every)))
        steps[layout] = mas.add_penalty_grad_
        dist.barrier()
        if layout.startswith("replicated"):
            keep = (model, wrapped, mas)  # both layouts' steps are timed side by side below
    times = measure(steps, torch.device("cpu"), reps=200, budget_s=6.0)
    med = {k: summarize(v)[0] for k, v in times.items()}
    r = ratio(times["sharded (FSDP2)"], times["replicated (DDP)"])
    mine = torch.tensor([med["replicated (DDP)"], med["sharded (FSDP2)"], r], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(WORLD)]
    dist.all_gather(every, mine)
    for rk, t in enumerate(every):
        note(f"  add_penalty_grad_ per step, rank {rk}: replicated {1e3 * float(t[0]):.2f} ms, sharded "
             f"{1e3 * float(t[1]):.2f} ms, sharded/replicated (paired rounds) {float(t[2]):.2f}")
    if rank == 0 and out:
        Path(out).write_text("\n".join(rows) + "\n")
    del keep
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=2896)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        mp.start_processes(run, args=(tmp, a.width, a.layers, a.out), nprocs=WORLD, start_method="spawn")
        print(f"({time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
