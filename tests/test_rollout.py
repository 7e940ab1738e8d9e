"""A new version appears while clients send requests: no request fails, and traffic moves (or,
for a version that cannot load, stays where it is)."""

import shutil
import threading
import time

import requests
from conftest import LiveGateway, copy_model_base
from drawings import draw_digit, png_bytes
from reliability import record

from training.push import push_version

CLIENTS = 16


class Clients:
    """CLIENTS threads sending a drawn 4 after another to a gateway while the `with` block runs:
    (answered at, version) of each right answer goes to `seen`, anything else to `failures`."""

    def __init__(self, url: str):
        self.url, self.seen, self.failures, self.stuck = url, [], [], 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.stuck = sum(thread.is_alive() for thread in self._threads)

    @property
    def versions(self) -> list[int]:
        return [v for _, v in self.seen]

    def _send(self) -> None:
        image = png_bytes(draw_digit(4))
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(self.url + "/v1/digits/predict", files={"image": image},
                                        timeout=30)
            except requests.RequestException as error:
                self.failures.append(repr(error))
                continue
            if response.status_code != 200 or response.json()["predictions"][0]["digit"] != 4:
                self.failures.append(f"{response.status_code} {response.text[:200]}")
            else:
                self.seen.append((time.monotonic(), response.json()["model"]["version"]))


def test_new_version_rolls_out_under_concurrent_requests_with_zero_failures(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    export = tmp_path / "export"
    shutil.copytree(trained.version_dir, export)
    live = LiveGateway(base)
    try:
        live.wait_for_model("digits")
        with Clients(live.url) as clients:
            time.sleep(1.0)
            pushed_at = time.monotonic()
            assert push_version(export, base / "digits") == 2
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and clients.versions[-20:] != [2] * 20:
                time.sleep(0.1)
            time.sleep(0.5)
    finally:
        live.close()
    versions, seen = clients.versions, clients.seen
    first_new = min((t for t, v in seen if v == 2), default=None)
    last_old = max((t for t, v in seen if v == 1), default=None)
    record("rollout_under_load", clients=CLIENTS, requests=len(seen) + len(clients.failures),
           failed=len(clients.failures), served_by_old=versions.count(1), served_by_new=versions.count(2),
           push_to_first_new_version_s=None if first_new is None else round(first_new - pushed_at, 2),
           push_to_last_old_version_s=None if last_old is None else round(last_old - pushed_at, 2))
    assert clients.stuck == 0
    assert clients.failures == []
    assert 1 in versions and 2 in versions
    assert versions[-20:] == [2] * 20
    assert len(seen) > 50


def test_a_version_that_cannot_load_appearing_under_load_fails_no_request(trained, tmp_path):
    """A broken version copied in by hand (push_version would have refused it): every request is
    still answered by the version already serving, through the poll that fails to load the new
    one and the polls after it."""
    base = copy_model_base(trained, tmp_path / "models")
    broken = tmp_path / "broken"
    shutil.copytree(trained.version_dir, broken)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    live = LiveGateway(base)  # polls every 0.2 s
    status = {}
    try:
        live.wait_for_model("digits")
        with Clients(live.url) as clients:
            time.sleep(1.0)
            appeared = len(clients.seen)
            broken.rename(base / "digits" / "2")  # whole at once, as a push would make it appear
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and status.get(2, {}).get("state") != "END":
                status = {v["version"]: v for v in live.model_report("digits")["versions"]}
                time.sleep(0.1)
            time.sleep(1.0)  # five more polls
    finally:
        live.close()
    record("broken_version_under_load", clients=CLIENTS,
           requests=len(clients.seen) + len(clients.failures), failed=len(clients.failures),
           answered_after_it_appeared=len(clients.seen) - appeared,
           broken_version_state=status.get(2, {}).get("state"))
    assert clients.stuck == 0
    assert clients.failures == []
    assert status.get(2, {}).get("state") == "END", status
    assert "Failed to load version 2" in status[2]["error"]
    assert set(clients.versions) == {1}
    assert len(clients.seen) - appeared > 20
