"""Which layer gets which rule: the plan of the estimators over the tracked parameters.

Every tracked parameter is given to the layers that use it:

* a module with a registered rule (``rules.rule_for``: Linear, Conv, Embedding,
  the norms, transformers' Conv1D, MultiheadAttention, the RNNs, or one you
  registered) covers the parameters the rule names; a rule may name
  parameters of its submodules (MultiheadAttention's ``out_proj``, which it
  uses without calling it), and those submodules then get no rule of their own;
* a module of another library named like a norm (``LlamaRMSNorm``, ``T5LayerNorm``:
  ``rules.norm.looks_like_norm``) gets ``AffineNormRule``, which observes which norm it computes;
* any other parameter goes to the module that owns it directly, with the
  generic module-local rule (a per-sample vjp of that module).

A parameter registered in several modules (tied weights: GPT-2's word
embedding and LM head) is *shared*: its per-sample contributions from every
use are summed before the absolute value (exact), or its Hebbian numerators
added (local). ``covered`` / ``uncovered`` say which parameters the local
(Hebbian) rules reach.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .rules import Rule, refresh_optional, rule_for
from .rules.generic import GenericRule, get_path
from .rules.norm import AffineNormRule, looks_like_norm

_AFFINE_NORM = AffineNormRule()


@dataclasses.dataclass(eq=False)
class Layer:
    """A module and its rule; ``attrs``: attribute path -> tracked name of each parameter it covers."""

    name: str
    module: nn.Module
    rule: Rule
    attrs: dict[str, str]

    def names(self) -> list[str]:
        return list(self.attrs.values())


class Plan:
    """The layers of ``module`` that cover the tracked ``params``, and the uses of each parameter."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]):
        refresh_optional()
        by_id = {id(p): n for n, p in params.items()}
        self.layers: list[Layer] = []
        self.uses: dict[str, list[tuple[Layer, str]]] = {n: [] for n in params}
        via_parent: set[int] = set()  # parameters a rule of an ancestor module covers
        seen: set[int] = set()
        for mname, m in module.named_modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            rule = rule_for(m)
            if rule is None and looks_like_norm(m):
                rule = _AFFINE_NORM
            attrs: dict[str, str] = {}
            if rule is not None:
                for path in rule.covers(m):
                    p = get_path(m, path)
                    if id(p) in via_parent or id(p) not in by_id:
                        continue
                    attrs[path] = by_id[id(p)]
                    if "." in path:
                        via_parent.add(id(p))
            mine = {id(get_path(m, a)) for a in attrs}
            rest = [a for a, p in m.named_parameters(recurse=False)
                    if id(p) in by_id and id(p) not in via_parent and id(p) not in mine]
            if attrs:
                self._add(Layer(mname, m, rule, attrs))
            if rest:
                self._add(Layer(mname, m, GenericRule(tuple(rest)), {a: by_id[id(getattr(m, a))] for a in rest}))
        # A parameter also registered in a module visited before the ancestor that covers it:
        # keep the ancestor's claim only.
        for name, uses in self.uses.items():
            if len(uses) > 1 and any("." in attr for _, attr in uses):
                self.uses[name] = [(layer, attr) for layer, attr in uses if "." in attr]
        for layer in self.layers:
            layer.attrs = {a: n for a, n in layer.attrs.items() if (layer, a) in self.uses[n]}
        self.layers = [layer for layer in self.layers if layer.attrs]
        self.shared = [n for n, uses in self.uses.items() if len(uses) > 1]
        local = {n for n, uses in self.uses.items()
                 if uses and all(layer.rule.local_supported for layer, _ in uses)}
        self.covered = [n for n in params if n in local]
        self.uncovered = [n for n in params if n not in local]

    def _add(self, layer: Layer) -> None:
        self.layers.append(layer)
        for attr, name in layer.attrs.items():
            self.uses[name].append((layer, attr))

    def reader(self, module: nn.Module) -> Layer | None:
        """The first layer of ``module`` (it says how the module reads its input)."""
        for layer in self.layers:
            if layer.module is module:
                return layer
        return None

    def modules(self) -> list[nn.Module]:
        """The modules whose calls the rules need, each once."""
        out, seen = [], set()
        for layer in self.layers:
            if id(layer.module) not in seen:
                seen.add(id(layer.module))
                out.append(layer.module)
        return out

