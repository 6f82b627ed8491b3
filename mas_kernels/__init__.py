"""mas_kernels: fast, exact Memory Aware Synapses (Aljundi et al., ECCV 2018) for PyTorch."""

__version__ = "0.1.0"

from . import _backend, optim
from ._backend import info as backend_info
from ._backend import use as use_backend
from .estimators import Rule, register_rule
from .mas import MAS
from .ops import abs_accumulate_, abs_bmm_accumulate_, abs_outer_accumulate_, penalty, penalty_grad_
from .sharded import ShardedPenalty
from .zero import ZeroPenalty

_backend.use()  # the kernels MAS_KERNELS_BACKEND asks for (default: auto) go on the dispatcher

__all__ = [
    "__version__",
    "MAS",
    "Rule",
    "register_rule",
    "ShardedPenalty",
    "ZeroPenalty",
    "optim",
    "use_backend",
    "backend_info",
    "abs_outer_accumulate_",
    "abs_accumulate_",
    "abs_bmm_accumulate_",
    "penalty_grad_",
    "penalty",
]
