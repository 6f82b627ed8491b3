"""The optimizer steps' step counts, shared by their PyTorch path and their Triton launchers."""

from __future__ import annotations

import torch


def by_step(state_steps: list[torch.Tensor]) -> dict[float, list[int]]:
    """The tensors' indices grouped by their step count (after the increment): usually one group."""
    torch._foreach_add_(state_steps, 1)
    groups: dict[float, list[int]] = {}
    for i, s in enumerate(torch.stack(state_steps).tolist()):
        groups.setdefault(s, []).append(i)
    return groups
