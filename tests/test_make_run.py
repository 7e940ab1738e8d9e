"""`make run`, the first of the README's two commands: it serves at once and trains beside the
server whatever model has no version yet; a model appears in the running service once pushed,
and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import requests
from conftest import ROOT, SONNETS, copy_model_base, environment_without_scribe_settings, free_port
from drawings import draw_digit, png_bytes


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_run_serves_at_once_trains_beside_it_and_ctrl_c_stops_everything(trained, tmp_path):
    models = copy_model_base(trained, tmp_path / "models")  # digits has a version, bard has none
    port = free_port()
    env = {**environment_without_scribe_settings(), "PORT": str(port), "SCRIBE_MODEL_DIR": str(models),
           "SCRIBE_POLL_SECONDS": "0.2", "TMPDIR": str(tmp_path)}
    train_args = f"TRAIN_ARGS=--profile quick --corpus {SONNETS} --runs-dir {tmp_path / 'runs'}"
    log = tmp_path / "make-run.log"
    with log.open("w") as out:
        make = subprocess.Popen(["make", "--no-print-directory", "run", train_args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a guard against a hang: this takes about a minute
        while True:
            assert make.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                models_now = {m["name"]: m["available"] for m in
                              requests.get(url + "/v1/models", timeout=10).json()["models"]}
                if models_now["digits"] and models_now["bard"]:  # make run trains no lower rung
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        text = log.read_text()
        # The gateway started before the language model was trained, and took it up by itself.
        assert text.index("Scribe gateway on http://") < text.index("bard: pushed version 1")
        drawing = {"image": png_bytes(draw_digit(7))}
        read = requests.post(url + "/v1/digits/predict", files=drawing, timeout=30)
        assert read.status_code == 200 and len(read.json()["predictions"]) == 1
        written = requests.post(url + "/v1/text/generate", json={"prompt": "A", "max_chars": 10}, timeout=30)
        assert written.status_code == 200 and len(written.json()["text"]) == 10
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        make.wait(timeout=120)
    deadline = time.monotonic() + 60
    while group_alive(make.pid):
        assert time.monotonic() < deadline, "make run left processes running after Ctrl-C"
        time.sleep(0.2)
    assert sorted(p.name for p in (models / "bard").iterdir() if p.name.isdigit()) == ["1"]
