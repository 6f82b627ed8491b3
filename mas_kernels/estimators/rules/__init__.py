"""Per-layer rules, one file per layer family, and the registry that maps layer types to them.

``base.py`` holds the interface (:class:`Rule`), :func:`register_rule` and
:func:`rule_for`; each other file the rules of one layer family. Rules for
the layer types of transformers are registered once it is imported.
"""

from __future__ import annotations

import sys

from torch import nn

from . import attention, conv, embedding, hf, linear, norm, rnn
from .base import Context, Rule, _RULES, register_rule, rule_for

__all__ = ["Context", "Rule", "refresh_optional", "register_rule", "rule_for"]

register_rule(nn.Linear, linear.LinearRule())
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_cls, conv.ConvRule())
register_rule(nn.Embedding, embedding.EmbeddingRule())
register_rule(nn.LayerNorm, norm.LayerNormRule())
register_rule(nn.GroupNorm, norm.GroupNormRule())
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_cls, norm.BatchNormRule())
for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_cls, norm.InstanceNormRule())
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, norm.RMSNormRule())
register_rule(nn.MultiheadAttention, attention.MultiheadAttentionRule())
for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    register_rule(_cls, rnn.RNNRule())


def refresh_optional() -> None:
    """Rules for layer types of optional packages that are imported by now (transformers')."""
    if "transformers" in sys.modules:
        hf.register_optional(_RULES)
