"""The one file format of a MAS state: safetensors, no pickle; the one writer and the one reader.

A file holds ``omega/<name>``, ``anchors/<name>`` and ``accumulator/<name>``
tensors (``<name>`` the parameter's ``named_parameters()`` name) and JSON
metadata, ``format`` = :data:`FORMAT` among it. :func:`write` writes a temp
file in the target's folder and renames it into place, so a reader never sees
a torn file; :func:`read` checks the container and the format before handing
the parts back, and the caller checks names and shapes before it changes
anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

FORMAT = "mas_kernels.MAS/1"
PARTS = ("omega", "anchors", "accumulator")


def write(path: str | os.PathLike, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Write ``parts`` (``{part: {name: tensor}}``) and ``meta`` (JSON-able values) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for part, named in parts.items():
        for name, t in named.items():
            tensors[f"{part}/{name}"] = t.detach().contiguous().cpu()
    header = {k: json.dumps(v) for k, v in {"format": FORMAT, **meta}.items()}
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=".mas-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike, who: str = "MAS.load",
         parts: tuple[str, ...] = PARTS) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({part: {name: tensor}}, metadata)`` from a file :func:`write` wrote; ``ValueError`` otherwise.

    ``parts``: which parts to read (others in the file are skipped unread).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            if raw.get("format") != json.dumps(FORMAT):
                raise ValueError(f"{who}: {path} was not written by mas_kernels.MAS.save "
                                 f"(format {raw.get('format')})")
            out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in parts}
            for key in f.keys():
                part, _, name = key.partition("/")
                if part not in PARTS or not name:
                    raise ValueError(f"{who}: {path} has an unexpected entry {key!r}")
                if part in out:
                    out[part][name] = f.get_tensor(key)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # safetensors raises its own error types on bad headers / sizes
        raise ValueError(f"{who}: {path} is not a readable safetensors file ({exc})") from exc
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{who}: {path} has corrupt metadata ({exc})") from exc
    return out, meta
