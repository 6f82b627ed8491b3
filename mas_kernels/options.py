"""The settings of a MAS wrapper, checked once: every bad value is a ``ValueError`` that names it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Iterable

import torch

from .ops.abs_bmm import check_memory_budget
from .state import STATE_DTYPES, check_combine

IMPORTANCE = ("local", "global", "global_batch")
UNCOVERED = ("global", "skip", "error")
NORMALIZATION = ("samples", "avalanche")


def check_lam(lam, who: str = "MAS") -> float:
    """``lam`` as a float: a finite number >= 0 whose gradient scale ``2 lam`` fits float32."""
    if isinstance(lam, bool) or not isinstance(lam, (numbers.Real, torch.Tensor)) or (
            isinstance(lam, torch.Tensor) and lam.numel() != 1):
        raise ValueError(f"{who}: lam must be a number (the penalty strength, >= 0), got {type(lam).__name__} {lam!r}")
    value = float(lam)
    if not math.isfinite(value) or value < 0 or 2 * value > float(torch.finfo(torch.float32).max):
        raise ValueError(f"{who}: lam={value!r} must be a finite number >= 0 (the penalty strength; 0 turns the "
                         "penalty off)")
    return value


def _positive_int(value, name: str, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
        raise ValueError(f"MAS: {name}={value!r} must be {what}")


@dataclasses.dataclass
class Options:
    """What ``MAS(...)`` was given (see its docstring), validated when made."""

    lam: float = 1.0
    importance: str = "local"
    combine: str | float = "sum"
    output_fn: Callable | None = None
    uncovered: str = "global"
    post_activation: Callable | dict | None = None
    include_frozen: bool = False
    chunk_size: int | None = None
    normalization: str = "samples"
    params: Callable | Iterable[str] | None = None
    omega_dtype: torch.dtype = torch.float32
    anchor_dtype: torch.dtype | None = None
    memory_budget: int | None = None
    forward: Callable | None = None

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise ValueError(f"MAS: importance={self.importance!r} is not one of {IMPORTANCE}")
        if self.uncovered not in UNCOVERED:
            raise ValueError(f"MAS: uncovered={self.uncovered!r} is not one of {UNCOVERED}")
        if self.normalization not in NORMALIZATION:
            raise ValueError(f"MAS: normalization={self.normalization!r} is not one of {NORMALIZATION}")
        _positive_int(self.chunk_size, "chunk_size", "a positive number of samples per chunk, or None (as many "
                      "as memory_budget allows)")
        # One definition of a budget (default, minimum, check): the op's, which gets the value in the end.
        self.memory_budget = check_memory_budget(self.memory_budget, "MAS")
        for name in ("output_fn", "forward"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ValueError(f"MAS: {name} must be a callable, got {type(fn).__name__}")
        if self.omega_dtype not in STATE_DTYPES:
            raise ValueError(f"MAS: omega_dtype={self.omega_dtype!r} must be torch.float32, torch.bfloat16 or "
                             "torch.float64 (float16's range, up to 65504, would turn large importances into inf)")
        if self.anchor_dtype is not None and self.anchor_dtype not in STATE_DTYPES:
            raise ValueError(f"MAS: anchor_dtype={self.anchor_dtype!r} must be None (each parameter's dtype), "
                             "torch.float32, torch.bfloat16 or torch.float64")
        self.lam = check_lam(self.lam)
        self.combine = check_combine(self.combine)
        self.include_frozen = bool(self.include_frozen)
