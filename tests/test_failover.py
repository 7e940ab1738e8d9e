"""Two model servers behind one gateway: calls spread over both with gRPC's round_robin, a call
that meets a dead server is retried on the other by gRPC's retry policy, and a server that comes
back takes calls again by itself. Clients see no failed request."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import requests
from conftest import DIGITS_CONFIG, LiveGateway, ModelServerProcess, copy_model_base, free_port
from drawings import draw_digit, png_bytes
from reliability import record

CLIENTS = 4
COUNT = re.compile(r':tensorflow:serving:request_count\{model_name="digits",status="OK"\} (\d+)')


class Replica:
    """One standalone model server, with TF Serving's Prometheus page on its REST port."""

    def __init__(self, config, base):
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.process = ModelServerProcess(
            f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}", f"--model_config_file={config}",
            f"--base_path_map=/models={base}", "--monitoring_config_file=serving/monitoring.config",
            "--file_system_poll_wait_seconds=0.5")

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(lambda: self.process.bound_at is not None, 180, "never listened")

    def predicts(self) -> int:
        """Predict calls this server has answered OK since it started."""
        page = f"http://127.0.0.1:{self.rest_port}/monitoring/prometheus/metrics"
        text = requests.get(page, timeout=10).text
        found = COUNT.search(text)
        return int(found.group(1)) if found else 0


def test_a_replica_killed_under_load_costs_no_request_and_takes_calls_again_once_back(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    config = tmp_path / "models.config"
    config.write_text(DIGITS_CONFIG % 'model_platform: "tensorflow"')
    a, b = Replica(config, base), Replica(config, base)
    a.start()
    b.start()
    live = LiveGateway(base, model_config=str(config), model_timeout_seconds=10,
                       model_server=f"127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}")
    outcomes, stop = Counter(), threading.Event()
    image = png_bytes(draw_digit(4))

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    status = session.post(live.url + "/v1/digits/predict", files={"image": image},
                                          timeout=30).status_code
                except requests.RequestException as error:
                    status = type(error).__name__
                outcomes[status] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        b.process.wait_until(lambda: a.predicts() > 20 and b.predicts() > 20, 120, "calls did not spread")
        served_by = {"a": a.predicts(), "b": b.predicts()}
        both_up = fleet_when(live.url, lambda answer: all(s["ready"] for s in answer["servers"]))
        b.process.kill()
        killed = time.monotonic()
        before = sum(outcomes.values())
        time.sleep(1.0)
        one_down = fleet(live.url)
        time.sleep(2.0)  # clients keep calling: every call goes to a, or is retried there
        during = sum(outcomes.values()) - before
        b.start()  # the same ports; it loads before it listens
        back = time.monotonic()
        b.process.wait_until(lambda: b.predicts() > 20, 60, "calls did not return to the restarted server")
        rebalanced = time.monotonic() - back
        # A status call fails fast while gRPC waits to reconnect (up to 1 s): /readyz never waits on
        # a dead server, and a restarted one shows as answering again within that second.
        both_back = fleet_when(live.url, lambda answer: all(s["ready"] for s in answer["servers"]))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        live.close()
        a.process.stop()
        b.process.stop()
    failures = {k: v for k, v in outcomes.items() if k != 200}
    record("model_server_replica_killed", clients=CLIENTS, requests=sum(outcomes.values()),
           failed=sum(failures.values()), before_kill_served_by_a=served_by["a"],
           before_kill_served_by_b=served_by["b"], requests_while_one_was_down=during,
           down_s=round(back - killed, 1), restarted_to_calls_again_s=round(rebalanced, 2),
           readyz_while_one_was_down=one_down["readyz"])
    assert failures == {}, failures
    assert during > 0
    addresses = [f"127.0.0.1:{a.grpc_port}", f"127.0.0.1:{b.grpc_port}"]
    for answer in (both_up, both_back):
        assert answer["readyz"] == 200
        assert [(s["address"], s["answered"], s["ready"]) for s in answer["servers"]] == [
            (addresses[0], True, True), (addresses[1], True, True)], answer["servers"]
        assert answer["models"][0]["servers"] == addresses
    assert one_down["readyz"] == 200, "one server with the required models is enough"
    assert [(s["address"], s["answered"], s["ready"]) for s in one_down["servers"]] == [
        (addresses[0], True, True), (addresses[1], False, False)]
    assert one_down["servers"][1]["reason"] == "model server: unavailable"
    assert one_down["servers"][1]["serving"] == {"digits": None}
    assert one_down["models"][0]["available"] and one_down["models"][0]["servers"] == addresses[:1]


def fleet(url: str) -> dict:
    """/readyz's status, with what /v1/models says about the models and each model server."""
    answer = requests.get(url + "/v1/models", timeout=30).json()
    return {"readyz": requests.get(url + "/readyz", timeout=30).status_code, **answer}


def fleet_when(url: str, condition, guard: float = 30) -> dict:
    """fleet(url) once `condition` holds of it; the guard only stops a hang."""
    deadline = time.monotonic() + guard
    while not condition(answer := fleet(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer
