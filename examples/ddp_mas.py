"""MAS under DistributedDataParallel: two tasks in sequence, importance from every rank's data.

    torchrun --nproc_per_node=2 examples/ddp_mas.py            # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node=2 examples/ddp_mas.py --importance local --lam 5

Each rank trains on its DistributedSampler shard; the MAS penalty needs no
communication (every replica adds the same term). After each task every rank
estimates importance on a disjoint slice of the task's data and
``consolidate()`` sums numerators and sample counts over the ranks, so every
rank holds the Omega one process would compute over the whole data set.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import mas_kernels as mk


def make_task(t: int, n: int = 1000) -> TensorDataset:
    """Synthetic 5-class task ``t``: inputs live in their own half of the features, labels by a random linear map."""
    g = torch.Generator().manual_seed(t + 1)
    x = torch.zeros(n, 20)
    x[:, 10 * t:10 * t + 10] = torch.randn(n, 10, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(1)
    return TensorDataset(x, y)


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorDataset, device) -> float:
    x, y = ds.tensors
    return (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--importance", default="global", choices=["local", "global", "global_batch"])
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--save", default=os.path.join(tempfile.gettempdir(), "mas_ddp.safetensors"))
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    mas = mk.MAS(ddp, lam=args.lam, importance=args.importance)  # names: "0.weight", ... (no "module.")
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)

    tasks = [make_task(t) for t in range(2)]
    for t, ds in enumerate(tasks):
        sampler = DistributedSampler(ds, shuffle=True, seed=t)
        loader = DataLoader(ds, batch_size=32, sampler=sampler)
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()  # DDP averages the task gradient
                mas.add_penalty_grad_()                # + 2 lam Omega (theta - theta*), local, no communication
                opt.step()
        # Importance of this task: each rank takes a disjoint slice (DistributedSampler would repeat
        # samples to even the ranks out); uneven counts and batch numbers are fine.
        mine = Subset(ds, range(rank, len(ds), world))
        mas.estimate(DataLoader(mine, batch_size=64))  # batches of (x, y): labels are ignored
        mas.consolidate()                              # all-reduce numerators and N: every rank, same Omega
        if rank == 0:
            accs = ", ".join(f"task {i}: {accuracy(model, d, device):.3f}" for i, d in enumerate(tasks[:t + 1]))
            print(f"after task {t}: accuracy {accs}; N = {mas.samples_consolidated}, "
                  f"mean Omega = {torch.cat([o.flatten() for o in mas.omega.values()]).mean():.3e}", flush=True)

    # Every rank holds the same Omega (a cheap check for the example, not needed in real code).
    flat = torch.cat([o.flatten() for o in mas.omega.values()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], o) for o in every), "ranks disagree on Omega"

    mas.save(args.save)  # rank 0 writes, the others wait; mas.load(path) works on every rank
    if rank == 0:
        print(f"saved {args.save}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
