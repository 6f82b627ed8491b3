"""The importance estimators, one file per rule family, and the plan of which layer gets which rule.

All rules add *numerators* (sums over samples) into fp32 staging buffers; the
wrapper divides by N, the number of samples, at ``consolidate()``. Positions
of extra dims (sequence, spatial) are summed within a sample.

* ``local.py``: the local (Hebbian) estimator, forward hooks only;
* ``global_exact.py``: the exact per-sample global estimator (the paper, Eq. 2),
  from one recorded forward and backward (``capture.py``), with the per-sample
  fallback;
* ``global_batch.py``: the batch-level estimator of the paper's released code;
* ``rules/``: one rule per layer type (exact, local, per-sample forms);
* ``reduction.py``: per-sample gradients -> numerators (``|.|`` for MAS);
* ``plan.py``: which layer's rule covers which parameter;
* ``batch.py``, ``layout.py``, ``uses.py``: what a batch is, where its samples
  are and which ops use each parameter, observed;
* ``verify.py``: the self-check against the per-sample definition.
"""

from .global_batch import BatchEstimator
from .global_exact import ExactEstimator, squared_norm
from .local import LocalEstimator
from .plan import Layer, Plan
from .reduction import ABS, AbsReduction, Reduction
from .rules import Rule, register_rule
from .verify import VerificationError

__all__ = ["ABS", "AbsReduction", "BatchEstimator", "ExactEstimator", "Layer", "LocalEstimator", "Plan",
           "Reduction", "Rule", "VerificationError", "register_rule", "squared_norm"]
