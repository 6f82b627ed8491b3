"""Adapters for the frameworks users already train with; each imports its framework only when imported.

* :mod:`mas_kernels.integrations.avalanche`: ``MASPlugin``, a drop-in for
  Avalanche's ``avalanche.training.plugins.MASPlugin`` (``pip install 'mas_kernels[avalanche]'``);
* :mod:`mas_kernels.integrations.transformers`: ``MASCallback`` for
  ``transformers.Trainer`` (``pip install 'mas_kernels[transformers]'``);
* :mod:`mas_kernels.integrations.lightning`: ``MASCallback`` for Lightning
  (``pip install 'mas_kernels[lightning]'``).

``import mas_kernels`` imports none of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType


# Said with the extra where installing it as it is can go wrong.
_BEFORE = {"avalanche": "first install torchvision from where your torch came from (a CPU torch: "
                        "--index-url https://download.pytorch.org/whl/cpu), or pip pulls a CUDA one; docs/install.md"}


def require(module: str, extra: str, who: str) -> ModuleType:
    """``import module``, or an ``ImportError`` that names the pip extra to install (and what was missing)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        before = f" ({_BEFORE[extra]})" if extra in _BEFORE else ""
        raise ImportError(
            f"{who} needs the {module.split('.')[0]!r} package, which could not be imported ({exc}); "
            f"install it with: pip install 'mas_kernels[{extra}]'{before}"
        ) from exc


def check_mas_options(options: dict, reserved: tuple[str, ...], who: str) -> None:
    """``TypeError`` naming an option ``MAS(...)`` does not take, or one the adapter sets itself, before
    any training (the wrapper itself is made when the framework hands over the model)."""
    from ..mas import MAS

    taken = [name for name in options if name in reserved]
    if taken:
        raise TypeError(f"{who}: {taken} are set by the adapter itself ({', '.join(reserved)}); "
                        "use the adapter's own arguments")
    known = inspect.signature(MAS).parameters
    unknown = [name for name in options if name not in known or name == "model"]
    if unknown:
        raise TypeError(f"{who}: unknown MAS option(s) {unknown}; MAS takes "
                        f"{[n for n in known if n != 'model']}")
    from ..options import Options

    fields = {f.name for f in dataclasses.fields(Options)}
    Options(**{k: v for k, v in options.items() if k in fields})  # a bad value: MAS's own ValueError, now
