"""Which layer gets which rule: the plan of an estimator over the tracked parameters.

A *layer* is a module with a rule of its own for the parameters it owns
(``weight``, ``bias``). A parameter is *covered* when such a layer owns it
alone; a parameter shared between modules (tied weights) has one importance
from all its uses, so no single layer's rule covers it.
"""

from __future__ import annotations

import dataclasses

from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = (nn.Linear,) + CONV_TYPES


@dataclasses.dataclass(frozen=True)
class Layer:
    """A module with a rule; ``weight``/``bias``: the tracked names of the parameters it covers (or None)."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


class Plan:
    """The layers of ``module`` whose rules cover tracked parameters; ``covered`` / ``uncovered`` names in order."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], types: tuple = LAYER_TYPES):
        owners: dict[int, list[str]] = {}
        for mname, m in module.named_modules(remove_duplicate=False):
            for _, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(mname)
        by_id = {id(p): n for n, p in params.items()}

        def sole(p) -> str | None:
            name = by_id.get(id(p)) if p is not None else None
            return name if name is not None and len(owners[id(p)]) == 1 else None

        self.layers: list[Layer] = []
        seen: set[int] = set()
        for mname, m in module.named_modules():
            if id(m) in seen or not isinstance(m, types):
                continue
            seen.add(id(m))
            layer = Layer(mname, m, sole(m.weight), sole(m.bias))
            if layer.names():
                self.layers.append(layer)
        covered = {n for layer in self.layers for n in layer.names()}
        self.covered = [n for n in params if n in covered]
        self.uncovered = [n for n in params if n not in covered]

    def owner(self, name: str) -> Layer | None:
        for layer in self.layers:
            if name in (layer.weight, layer.bias):
                return layer
        return None
