"""A new version appears while clients send requests: no request fails, and traffic moves."""

import shutil
import threading
import time

import requests
from conftest import LiveGateway, copy_model_base
from drawings import draw_digit, png_bytes

from training.push import push_version


def test_new_version_rolls_out_under_concurrent_requests_with_zero_failures(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    export = tmp_path / "export"
    shutil.copytree(trained.version_dir, export)
    live = LiveGateway(base)
    live.wait_for_model("digits")
    image = png_bytes(draw_digit(4))
    seen, failures, stop = [], [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            response = session.post(live.url + "/v1/digits/predict", files={"image": image}, timeout=30)
            if response.status_code != 200 or response.json()["predictions"][0]["digit"] != 4:
                failures.append(response.text)
            else:
                seen.append(response.json()["model"]["version"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert push_version(export, base / "digits") == 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and seen[-20:].count(2) < 20:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        live.close()
    assert failures == []
    assert 1 in seen and 2 in seen
    assert seen[-20:] == [2] * 20
    assert len(seen) > 50
