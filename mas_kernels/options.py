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
VERIFY = (True, False, "always")
UNCOVERED = ("global", "skip", "error")
NORMALIZATION = ("samples", "avalanche")
BATCH_RANKS = ("per_rank", "concatenated")


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
    sample_dim: int | dict | None = None
    verify: bool | str = True
    per_sample_fallback: Callable | Iterable[str] | bool | None = None
    batch_ranks: str = "per_rank"

    def fallback_predicate(self) -> Callable[[str], bool] | None:
        """``per_sample_fallback=`` as a ``name -> bool`` predicate (None: no parameter forced)."""
        f = self.per_sample_fallback
        if f is None or f is False:
            return None
        if f is True:
            return _Always()
        if callable(f):
            return f
        return _Names(f)

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise ValueError(f"MAS: importance={self.importance!r} is not one of {IMPORTANCE}")
        if self.uncovered not in UNCOVERED:
            raise ValueError(f"MAS: uncovered={self.uncovered!r} is not one of {UNCOVERED}")
        if self.batch_ranks not in BATCH_RANKS:
            raise ValueError(f"MAS: batch_ranks={self.batch_ranks!r} is not one of {BATCH_RANKS} (global_batch on "
                             "FSDP2 shards: each rank's batch a batch, or the ranks' batches one batch)")
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
        if self.verify not in VERIFY or not isinstance(self.verify, (bool, str)):
            raise ValueError(f"MAS: verify={self.verify!r} must be True (self-check on the first batch of each "
                             "call signature), 'always' (every batch) or False")
        sd = self.sample_dim
        if sd is not None and not (isinstance(sd, int) and not isinstance(sd, bool) and sd >= 0) and not (
                isinstance(sd, dict) and all(isinstance(k, (int, str)) and (v is None or (isinstance(v, int)
                                             and not isinstance(v, bool) and v >= 0)) for k, v in sd.items())):
            raise ValueError(f"MAS: sample_dim={sd!r} must be a dim (int >= 0) of the model's first tensor "
                             "argument, or a dict {argument name or position: dim or None (shared)}")
        f = self.per_sample_fallback
        if f is not None and not isinstance(f, bool) and not callable(f):
            if isinstance(f, (str, bytes)) or not hasattr(f, "__iter__") or not all(isinstance(n, str) for n in f):
                raise ValueError(f"MAS: per_sample_fallback={f!r} must be a list of parameter names, a callable "
                                 "name -> bool, or True (every parameter)")
            self.per_sample_fallback = list(f)
        self.lam = check_lam(self.lam)
        self.combine = check_combine(self.combine)
        self.include_frozen = bool(self.include_frozen)


class _Always:
    def __call__(self, name: str) -> bool:
        return True


class _Names:
    """A set of parameter names as a predicate (a class, so a wrapper using it can be pickled)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def __call__(self, name: str) -> bool:
        return name in self.names
