"""The primitive ops, registered with ``torch.library`` under ``mas_kernels::``.

Importing this package defines them; ``import mas_kernels`` then puts the
chosen backend's kernels on the dispatcher (``MAS_KERNELS_BACKEND``; see
``mas_kernels._backend``).
"""

from .abs_accumulate import abs_accumulate_
from .abs_bmm import abs_bmm_accumulate_
from .abs_outer import abs_outer_accumulate_
from . import optim_step  # noqa: F401  (defines adam_penalty_step_, sgd_penalty_step_; mas_kernels.optim calls them)
from .penalty import penalty, penalty_grad_

__all__ = ["abs_outer_accumulate_", "abs_accumulate_", "abs_bmm_accumulate_", "penalty_grad_", "penalty"]
