"""The model server is killed under load and started again: the gateway fails cleanly, then
recovers by itself.

Split topology, as in docker-compose: the model server is its own process
(`python -m serving.model_server`, TF Serving's flags), the gateway talks to it over gRPC. While
clients send digits continuously, the model server gets SIGKILL. Every request must end as a 200
or as a 503/504 JSON error within the gateway's deadline (never a 500, never a hang), /readyz
must turn 503, and once the model server is started again on the same port the gateway and
/readyz must come back with nobody touching the gateway.
"""

import threading
import time
from collections import Counter

import requests
from conftest import (
    DIGITS_CONFIG,
    LiveGateway,
    ModelServerProcess,
    copy_model_base,
    free_port,
    wait_for_readyz,
)
from drawings import draw_digit, png_bytes
from reliability import record, rss_mb

CYCLES = 3
CLIENTS = 4
MODEL_TIMEOUT = 2.0  # the gateway's deadline for each gRPC call
MARGIN = 5.0  # a failure may take the deadline plus this (a shared, noisy machine)
READYZ_TIMEOUT = MODEL_TIMEOUT + MARGIN  # for each /readyz request
DOWN_SECONDS = 8.0  # dead this long after /readyz noticed: gRPC's default backoff would reach 10 s+
RECOVERY_BOUND = 120.0  # restart -> first 200: process start, TensorFlow import, model load
RECONNECT_BOUND = 5.0  # port bound -> gateway connected; model loaded -> first 200 through it


def test_killed_model_server_gives_clean_errors_and_the_gateway_recovers_by_itself(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    config = tmp_path / "models.config"
    config.write_text(DIGITS_CONFIG % 'model_platform: "tensorflow"')  # /readyz waits for every model
    port = free_port()
    server = ModelServerProcess("--port", str(port), "--model_config_file", str(config),
                                "--base_path_map", f"/models={base}",
                                "--file_system_poll_wait_seconds", "0.5")
    server.start()
    live = LiveGateway(base, model_server=f"127.0.0.1:{port}", model_config=str(config),
                       model_timeout_seconds=MODEL_TIMEOUT)
    image = png_bytes(draw_digit(7))
    outcomes = []  # (finished at, status or error text, seconds taken, error code)
    stop = threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(live.url + "/v1/digits/predict", files={"image": image},
                                        timeout=MODEL_TIMEOUT + MARGIN + 10)
            except requests.RequestException as error:
                outcomes.append((time.monotonic(), f"no answer: {error!r}", time.monotonic() - started, ""))
                time.sleep(0.02)  # as a client backs off: resending at once would starve the CPU
                continue
            try:
                code = response.json()["error"]["code"] if response.status_code != 200 else ""
            except (ValueError, KeyError, TypeError):
                code = f"not a JSON error: {response.text[:100]!r}"
            if response.status_code == 200 and response.json()["predictions"][0]["digit"] != 7:
                code = "wrong digit"
            outcomes.append((time.monotonic(), response.status_code, time.monotonic() - started, code))
            if response.status_code != 200:
                time.sleep(0.02)  # a 503 comes back at once while the model server is down

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    cycles = []
    try:
        server.wait_loaded(RECOVERY_BOUND)
        wait_for_readyz(live.url, 200, RECOVERY_BOUND, READYZ_TIMEOUT)
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        rss_before = rss_mb()
        for _ in range(CYCLES):
            steady = time.monotonic()
            time.sleep(1.5)  # steady load on a healthy model server
            served_before = sum(1 for o in list(outcomes) if o[1] == 200 and o[0] > steady)
            server.kill()
            killed = time.monotonic()
            readyz_503, _ = wait_for_readyz(live.url, 503, MODEL_TIMEOUT + MARGIN, READYZ_TIMEOUT)
            time.sleep(DOWN_SECONDS)
            server.start()
            restarted = time.monotonic()
            # Requests sent and answered while nothing listened on the model server's port.
            dead_outcomes = [o for o in list(outcomes) if readyz_503 < o[0] - o[2] and o[0] < restarted]
            readyz_200, reconnected = wait_for_readyz(live.url, 200, RECOVERY_BOUND, READYZ_TIMEOUT)
            bound, loaded = server.wait_loaded(RECOVERY_BOUND)
            deadline = time.monotonic() + RECOVERY_BOUND
            while time.monotonic() < deadline and not any(
                    o[1] == 200 and o[0] > restarted for o in list(outcomes)):
                time.sleep(0.05)
            first_200 = min((o[0] for o in list(outcomes) if o[1] == 200 and o[0] > restarted),
                            default=None)
            assert first_200 is not None, "no request succeeded after the restart"
            cycles.append({
                "served_before_kill": served_before,
                "readyz_503_after_kill": readyz_503 - killed,
                "down_answers": Counter(o[1] for o in dead_outcomes),
                "restart_to_first_200": first_200 - restarted,
                "bound_to_reconnected": reconnected - bound,
                "restart_to_readyz_200": readyz_200 - restarted,
                "loaded_to_first_200": first_200 - loaded,
                "loaded_to_readyz_200": readyz_200 - loaded,
            })
        time.sleep(1.0)
        rss_after = rss_mb()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=MODEL_TIMEOUT + MARGIN + 15)
        stuck = sum(thread.is_alive() for thread in threads)
        live.close()
        if server.process.poll() is None:
            server.kill()

    assert stuck == 0, f"{stuck} client threads never finished"
    statuses = Counter(o[1] for o in outcomes)
    failures = [o for o in outcomes if o[1] != 200]
    slowest_failure = max((o[2] for o in failures), default=0.0)
    record("model_server_killed_under_load",
           clients=CLIENTS, cycles=CYCLES, model_timeout_s=MODEL_TIMEOUT,
           requests=len(outcomes), succeeded=statuses[200],
           failed_by_status=", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str) if k != 200),
           http_500=sum(1 for o in outcomes if o[1] == 500),
           slowest_failure_ms=round(slowest_failure * 1000),
           restart_to_first_200_s=[round(c["restart_to_first_200"], 2) for c in cycles],
           restart_to_readyz_200_s=[round(c["restart_to_readyz_200"], 2) for c in cycles],
           model_loaded_to_first_200_s=[round(c["loaded_to_first_200"], 2) for c in cycles],
           model_loaded_to_readyz_200_s=[round(c["loaded_to_readyz_200"], 2) for c in cycles],
           port_bound_to_gateway_reconnected_s=[round(c["bound_to_reconnected"], 2) for c in cycles],
           kill_to_readyz_503_s=[round(c["readyz_503_after_kill"], 2) for c in cycles],
           gateway_rss_mb_before=rss_before, gateway_rss_mb_after=rss_after)

    assert statuses[500] == 0
    assert not [o for o in outcomes if not isinstance(o[1], int)], "requests got no answer"
    assert set(statuses) <= {200, 503, 504}, statuses
    assert {o[3] for o in failures} <= {"model_unavailable", "model_timeout"}, Counter(o[3] for o in failures)
    assert not [o for o in outcomes if o[3] == "wrong digit"]
    assert slowest_failure < MODEL_TIMEOUT + MARGIN, f"a failure took {slowest_failure:.1f} s"
    for cycle in cycles:
        assert cycle["served_before_kill"] > 0
        # Dead model server: every answer is a quick 503, none a success from nowhere.
        assert cycle["down_answers"] and set(cycle["down_answers"]) == {503}, cycle
        # gRPC's reconnect backoff: the gateway finds the restarted model server by itself, soon.
        assert cycle["bound_to_reconnected"] < RECONNECT_BOUND, cycle
        assert cycle["loaded_to_first_200"] < RECONNECT_BOUND, cycle
        assert cycle["loaded_to_readyz_200"] < RECONNECT_BOUND, cycle
    assert rss_after - rss_before < 300, (rss_before, rss_after)
