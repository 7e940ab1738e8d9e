"""Starting the gateway under gunicorn with the embedded model server: a request that arrives
while it starts waits for a worker whose models are loaded and warmed up, instead of getting a
503 from a worker still loading them; and each worker sends its own warm-up requests through
itself first, which its HTTP metrics leave out."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import DIGITS_CONFIG, copy_model_base, launch_gateway, start_gateway
from drawings import draw_digit, png_bytes


def test_requests_sent_during_start_up_wait_for_loaded_models(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    config = tmp_path / "models.config"
    config.write_text(DIGITS_CONFIG % "")  # digits only
    live = launch_gateway(tmp_path, {
        "SCRIBE_MODEL_DIR": str(base), "SCRIBE_MODEL_CONFIG": str(config),
        # A long warmup, so that loading lasts a while after each worker has its app.
        "SCRIBE_WARMUP_ITERATIONS": "300"}, workers=2)
    process, log = live.process, live.log
    try:
        # The arbiter listens before its workers start: send as soon as it does.
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", live.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        sent = time.monotonic()
        body = png_bytes(draw_digit(3))

        def post(_):
            return requests.post(live.url + "/v1/digits/predict", data=body,
                                 headers={"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        waited = time.monotonic() - sent
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        assert {r.json()["predictions"][0]["digit"] for r in responses} == {3}
        text = log.read_text()
        assert waited > 1 and "is ready and accepting connections" in text, text[-3000:]
    finally:
        live.stop()


def test_a_worker_warms_itself_up_before_taking_connections_and_counts_no_http_request(
        trained, trained_bard, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    copy_model_base(trained_bard, base)
    # With API keys on: the warm-up requests are the gateway's own and pass without one.
    live = start_gateway(tmp_path, {"SCRIBE_MODEL_DIR": str(base), "SCRIBE_API_KEYS": "warm-key"})
    key = {"X-API-Key": "warm-key"}
    try:
        log = live.log.read_text()
        assert "warm-up: 3 of 3 requests answered" in log, log[-3000:]
        assert log.index("warm-up: 3 of 3") < log.index("is ready and accepting connections")

        def metrics() -> list[str]:
            return requests.get(live.url + "/metrics", headers=key, timeout=10).text.splitlines()

        before = metrics()
        # The model server ran the warm-up's calls (two digits, one generation) ...
        assert 'scribe_model_call_seconds_count{model="digits",outcome="OK"} 2.0' in before
        # ... but no client sent an HTTP request yet: the warm-up is not one.
        assert not [line for line in before if line.startswith("scribe_http_requests_total{")
                    and "/v1/" in line], before
        answer = requests.post(live.url + "/v1/digits/predict", data=png_bytes(draw_digit(4)),
                               headers={"Content-Type": "image/png", **key}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["digit"] == 4, answer.text
        assert 'scribe_http_requests_total{endpoint="/v1/digits/predict",method="POST",status="200"} 1.0' \
            in metrics()
    finally:
        live.stop()
