"""The three primitive ops, registered with ``torch.library`` under ``mas_kernels::``."""

from .abs_accumulate import abs_accumulate_
from .abs_outer import abs_outer_accumulate_
from .penalty import penalty, penalty_grad_
from ._library import register_native_cpu_kernels

NATIVE_CPU_KERNELS = register_native_cpu_kernels()

__all__ = ["abs_outer_accumulate_", "abs_accumulate_", "penalty_grad_", "penalty"]
