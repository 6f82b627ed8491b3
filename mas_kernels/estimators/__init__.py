"""The importance estimators, one file per rule family, and the plan of which layer gets which rule.

All rules add *numerators* (sums over samples) into fp32 staging buffers; the
wrapper divides by N, the number of samples, at ``consolidate()``. Positions
of extra dims (sequence, spatial) are summed within a sample.

* ``local.py``: the local (Hebbian) rule, forward hooks only;
* ``global_exact.py``: the exact per-sample global rule (the paper, Eq. 2);
* ``global_batch.py``: the batch-level rule of the paper's released code;
* ``plan.py``: the layers with a rule and which parameters they cover.
"""

from .global_batch import BatchRule, squared_norm
from .global_exact import ExactRule
from .local import LocalRule
from .plan import Plan

__all__ = ["BatchRule", "ExactRule", "LocalRule", "Plan", "squared_norm"]
