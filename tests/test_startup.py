"""Starting the gateway under gunicorn with the embedded model server: a request that arrives
while it starts waits for a worker whose models are loaded and warmed up, instead of getting a
503 from a worker still loading them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import DIGITS_CONFIG, ROOT, copy_model_base, environment_without_scribe_settings, free_port
from drawings import draw_digit, png_bytes


def test_requests_sent_during_start_up_wait_for_loaded_models(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    config = tmp_path / "models.config"
    config.write_text(DIGITS_CONFIG % "")  # digits only
    port = free_port()
    env = {**environment_without_scribe_settings(), "PORT": str(port), "SCRIBE_WORKERS": "2",
           "SCRIBE_MODEL_DIR": str(base), "SCRIBE_MODEL_CONFIG": str(config),
           # A long warmup, so that loading lasts a while after each worker has its app.
           "SCRIBE_WARMUP_ITERATIONS": "300"}
    log = tmp_path / "gunicorn.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        # The arbiter listens before its workers start: send as soon as it does.
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        sent = time.monotonic()
        body = png_bytes(draw_digit(3))

        def post(_):
            return requests.post(f"http://127.0.0.1:{port}/v1/digits/predict", data=body,
                                 headers={"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        waited = time.monotonic() - sent
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        assert {r.json()["predictions"][0]["digit"] for r in responses} == {3}
        text = log.read_text()
        assert waited > 1 and "is ready and accepting connections" in text, text[-3000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
