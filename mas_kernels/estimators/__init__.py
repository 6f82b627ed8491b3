"""The importance estimators, one file per rule family, and the plan of which layer gets which rule.

All rules add *numerators* (sums over samples) into fp32 staging buffers; the
wrapper divides by N, the number of samples, at ``consolidate()``. Positions
of extra dims (sequence, spatial) are summed within a sample.

* ``local.py``: the local (Hebbian) rule, forward hooks only;
* ``global_exact.py``: the exact per-sample global rule (the paper, Eq. 2),
  from one recorded forward and backward (``capture.py``);
* ``global_batch.py``: the batch-level rule of the paper's released code;
* ``rules/``: one rule per layer type (exact, local, per-sample forms);
* ``plan.py``: which layer's rule covers which parameter.
"""

from .global_batch import BatchRule, squared_norm
from .global_exact import ExactRule
from .local import LocalRule
from .plan import Layer, Plan
from .rules import Rule, register_rule

__all__ = ["BatchRule", "ExactRule", "Layer", "LocalRule", "Plan", "Rule", "register_rule", "squared_norm"]
