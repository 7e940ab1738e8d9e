"""A new version appears while clients send requests: no request fails, and traffic moves."""

import shutil
import threading
import time

import requests
from conftest import LiveGateway, copy_model_base
from drawings import draw_digit, png_bytes
from reliability import record

from training.push import push_version

CLIENTS = 16


def test_new_version_rolls_out_under_concurrent_requests_with_zero_failures(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    export = tmp_path / "export"
    shutil.copytree(trained.version_dir, export)
    live = LiveGateway(base)
    live.wait_for_model("digits")
    image = png_bytes(draw_digit(4))
    seen, failures, stop = [], [], threading.Event()  # seen: (answered at, version)

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(live.url + "/v1/digits/predict", files={"image": image},
                                        timeout=30)
            except requests.RequestException as error:
                failures.append(repr(error))
                continue
            if response.status_code != 200 or response.json()["predictions"][0]["digit"] != 4:
                failures.append(f"{response.status_code} {response.text[:200]}")
            else:
                seen.append((time.monotonic(), response.json()["model"]["version"]))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        pushed_at = time.monotonic()
        assert push_version(export, base / "digits") == 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and [v for _, v in seen[-20:]] != [2] * 20:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        stuck = sum(thread.is_alive() for thread in threads)
        live.close()
    versions = [v for _, v in seen]
    first_new = min((t for t, v in seen if v == 2), default=None)
    last_old = max((t for t, v in seen if v == 1), default=None)
    record("rollout_under_load", clients=CLIENTS, requests=len(seen) + len(failures),
           failed=len(failures), served_by_old=versions.count(1), served_by_new=versions.count(2),
           push_to_first_new_version_s=None if first_new is None else round(first_new - pushed_at, 2),
           push_to_last_old_version_s=None if last_old is None else round(last_old - pushed_at, 2))
    assert stuck == 0
    assert failures == []
    assert 1 in versions and 2 in versions
    assert versions[-20:] == [2] * 20
    assert len(seen) > 50
