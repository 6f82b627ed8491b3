"""mas_kernels: fast, exact Memory Aware Synapses (Aljundi et al., ECCV 2018) for PyTorch."""

__version__ = "0.1.0"

from .ops import abs_accumulate_, abs_outer_accumulate_, penalty, penalty_grad_
from .ops import abs_bmm_accumulate_
from .mas import MAS
from ._backend import use as use_backend

__all__ = [
    "__version__",
    "MAS",
    "use_backend",
    "abs_outer_accumulate_",
    "abs_accumulate_",
    "penalty_grad_",
    "penalty",
    "abs_bmm_accumulate_",
]
