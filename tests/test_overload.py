"""Overload: more generations than the gateway takes, abandoned streams and slow clients.

The real gateway runs under gunicorn (`python -m serving`, one worker, a few threads) over the
tiny real models, with room for two generations at a time and a 2 s client timeout. Requests
over the bound get 429 with Retry-After at once, admitted ones finish, streams give their slot
back however they end, and clients that stall are disconnected instead of holding threads."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import (
    ROOT,
    Gunicorn,
    copy_model_base,
    environment_without_scribe_settings,
    start_gateway,
    wait_for_readyz,
)
from drawings import chunked, padded_png
from reliability import record

from serving.gateway.config import Settings

THREADS = 6
MAX_GENERATIONS = 2
CLIENT_TIMEOUT = 2.0
LINGER = 2.0  # a closing connection's thread waits this long at most for the client to close


@pytest.fixture(scope="module")
def server(trained, trained_bard, tmp_path_factory):
    folder = tmp_path_factory.mktemp("overload")
    copy_model_base(trained, folder / "models")
    copy_model_base(trained_bard, folder / "models")
    live = start_gunicorn(folder)
    yield live
    live.stop()


def start_gunicorn(folder: Path, workers: int = 1) -> Gunicorn:
    """`python -m serving` over `folder`/models with the overload settings, once /readyz answers
    200 (from every worker)."""
    (folder / "tmp").mkdir(exist_ok=True)
    return start_gateway(folder, {
        "SCRIBE_MODEL_DIR": str(folder / "models"), "SCRIBE_THREADS": str(THREADS),
        "SCRIBE_MAX_GENERATIONS": str(MAX_GENERATIONS), "SCRIBE_CLIENT_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT),
        "SCRIBE_STREAM_CHUNK_CHARS": "1",  # one model call per character: streams last seconds
        "TMPDIR": str(folder / "tmp"),  # where each worker makes its model server's socket folder
    }, workers)


def generate(server: Gunicorn, seed: int, max_chars: int = 500) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    response = requests.post(server.url + "/v1/text/generate", timeout=60,
                             json={"prompt": "ROMEO:", "max_chars": max_chars, "seed": seed})
    return response, time.perf_counter() - started


def burst(server: Gunicorn, count: int, max_chars: int = 500) -> list[tuple[requests.Response, float]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda seed: generate(server, seed, max_chars), range(count)))


def open_stream(server: Gunicorn, max_chars: int) -> socket.socket:
    """A streamed generation over a raw socket, read up to its first event."""
    body = f'{{"prompt": "ROMEO:", "max_chars": {max_chars}, "seed": 3, "stream": true}}'.encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/text/generate HTTP/1.1\r\nHost: scribe\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"event: chunk" not in received:
        data = sock.recv(4096)
        assert data, "the stream ended before its first event"
        received += data
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_a_burst_over_the_bound_gets_429_at_once_and_admitted_generations_finish(server):
    generate(server, seed=0)  # memory is measured from after a first generation
    rss_before = server.worker_rss_mb()
    rejections_before = server.metric("scribe_generation_rejections_total")

    results = burst(server, 48)

    statuses = [response.status_code for response, _ in results]
    admitted = [(response, seconds) for response, seconds in results if response.status_code == 200]
    rejected = [(response, seconds) for response, seconds in results if response.status_code == 429]
    assert len(admitted) + len(rejected) == len(results), statuses  # no 5xx, nothing else
    assert len(admitted) >= MAX_GENERATIONS and rejected, statuses
    for response, _ in admitted:
        assert response.json()["text"], response.text
    for response, _ in rejected:
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["Retry-After"]) >= 1
    reject_seconds = [seconds for _, seconds in rejected]
    # Turned away without waiting for a slot: far quicker than a queue behind the generations.
    assert max(reject_seconds) < 3, reject_seconds
    assert statistics.median(reject_seconds) < 1, reject_seconds
    assert server.metric("scribe_generation_rejections_total") - rejections_before == len(rejected)

    server.wait_until_idle()
    rss_after = server.worker_rss_mb()
    assert rss_after - rss_before < 150, (rss_before, rss_after)
    record("generation_overload", requests=len(results), max_generations=MAX_GENERATIONS,
           threads=THREADS, admitted=len(admitted), rejected_429=len(rejected),
           failures=len(results) - len(admitted) - len(rejected),
           max_reject_ms=round(max(reject_seconds) * 1000),
           median_reject_ms=round(statistics.median(reject_seconds) * 1000),
           max_admitted_ms=round(max(seconds for _, seconds in admitted) * 1000),
           rss_before_mb=rss_before, rss_after_mb=rss_after)


def test_full_capacity_comes_back_after_a_burst(server):
    burst(server, 24)
    server.wait_until_idle()
    results = burst(server, MAX_GENERATIONS, max_chars=50)
    assert [response.status_code for response, _ in results] == [200] * MAX_GENERATIONS


def test_a_stream_holds_its_slot_until_the_client_goes_away(server):
    server.wait_until_idle()
    # Each stream would write 2,000 characters one model call at a time: many seconds.
    streams = [open_stream(server, max_chars=2000) for _ in range(MAX_GENERATIONS)]
    assert server.metric("scribe_generations_in_flight") == MAX_GENERATIONS
    response, _ = generate(server, seed=1, max_chars=10)
    assert response.status_code == 429

    for stream in streams:
        stream.close()
    released = server.wait_until_idle(timeout=10)

    results = burst(server, MAX_GENERATIONS, max_chars=50)
    assert [response.status_code for response, _ in results] == [200] * MAX_GENERATIONS
    record("abandoned_streams", streams=len(streams), max_generations=MAX_GENERATIONS,
           slots_back_after_ms=round(released * 1000), capacity_after=MAX_GENERATIONS)


def test_a_finished_stream_gives_its_slot_back(server):
    server.wait_until_idle()
    response = requests.post(server.url + "/v1/text/generate", timeout=60, json={
        "prompt": "ROMEO:", "max_chars": 20, "seed": 5, "stream": True})
    assert response.status_code == 200 and "event: done" in response.text
    server.wait_until_idle(timeout=5)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it, or the
    socket's timeout passes)."""
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except (ConnectionResetError, TimeoutError):
        pass
    return received


def test_slow_clients_are_disconnected_and_do_not_starve_others(server):
    """Three times as many stalled connections as threads: half stop in the headers, half in the body."""
    partial_headers = b"POST /v1/text/generate HTTP/1.1\r\nHost: scribe\r\nContent-Ty"
    partial_body = (b"POST /v1/text/generate HTTP/1.1\r\nHost: scribe\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 200\r\n\r\n{\"prompt\": \"RO")
    started = time.monotonic()

    def closed_after(sock: socket.socket) -> tuple[float, bytes]:
        received = read_until_closed(sock)
        return time.monotonic() - started, received

    slow = []
    with ThreadPoolExecutor(3 * THREADS) as pool:
        for i in range(3 * THREADS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(partial_headers if i % 2 == 0 else partial_body)
            slow.append(sock)
        watching = [pool.submit(closed_after, sock) for sock in slow]
        time.sleep(0.5)  # every thread is now waiting on a stalled client
        served = requests.get(server.url + "/v1/models", timeout=60)
        served_after = time.monotonic() - started
        closes = [future.result() for future in watching]
    for sock in slow:
        sock.close()
    # The threads take the stalled clients THREADS at a time (the other request queues behind
    # them). Each round is over within the client timeout plus a closing connection's linger.
    rounds = -(-len(slow) // THREADS)
    assert served.status_code == 200
    assert served_after < rounds * (CLIENT_TIMEOUT + LINGER) + 8, served_after
    close_times = sorted(seconds for seconds, _ in closes)
    for i, seconds in enumerate(close_times):
        assert CLIENT_TIMEOUT * 0.9 <= seconds < (i // THREADS + 1) * (CLIENT_TIMEOUT + LINGER) + 1, \
            close_times
    for i, (_, received) in enumerate(closes):
        if i % 2 == 0:
            assert received == b"", received  # no request to answer: just closed
        else:
            assert received == b"" or received.startswith(b"HTTP/1.1 400"), received
    response, _ = generate(server, seed=2, max_chars=50)
    assert response.status_code == 200
    record("slow_clients", slow_connections=len(slow), threads=THREADS,
           client_timeout_s=CLIENT_TIMEOUT, other_request_served_s=round(served_after, 2),
           first_closed_s=round(min(s for s, _ in closes), 2),
           last_closed_s=round(max(s for s, _ in closes), 2))


def test_a_chunked_body_of_exactly_the_limit_is_served(server):
    """The same under gunicorn, whose chunked reader is the one production uses."""
    body = padded_png(3, Settings().max_body_bytes)  # the server runs with the default limit
    url, headers = server.url + "/v1/digits/predict", {"Content-Type": "image/png"}
    response = requests.post(url, data=chunked(body), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 3
    response = requests.post(url, data=chunked(body + b"\0"), headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_entity_too_large"


def test_a_client_gone_right_at_the_body_limit_gets_400_not_500(server):
    """A chunked body that reaches the size limit inside a chunk that claims more, then ends:
    the look past the limit finds the client gone, which is the client's fault, not a 500."""
    limit = Settings().max_body_bytes
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/digits/predict HTTP/1.1\r\nHost: scribe\r\nContent-Type: image/png\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (limit + 1))
    sock.sendall(b"\0" * limit)
    sock.shutdown(socket.SHUT_WR)
    received = read_until_closed(sock)
    sock.close()
    assert received.startswith(b"HTTP/1.1 400"), received[:300]
    assert b'"code":"bad_request"' in received.replace(b" ", b""), received[-300:]
    assert b"incomplete or malformed after the size limit" in received, received[-300:]
    response, _ = generate(server, seed=4, max_chars=20)
    assert response.status_code == 200


def exchange(server: Gunicorn, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection (or 10 s pass)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(request)
    received = read_until_closed(sock)
    sock.close()
    return received


@pytest.mark.parametrize("body", [b"ZZ\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX\r\n0\r\n\r\n",
                                  b"3;\x01\r\nabc\r\n0\r\n\r\n"],
                         ids=["size-not-hex", "no-crlf-after-data", "control-byte-in-extension"])
@pytest.mark.parametrize("path", ["/v1/digits/predict", "/healthz"])
def test_a_malformed_chunked_body_is_400_json_on_every_endpoint(server, path, body):
    """gunicorn's chunk parser raises inside the app when the body is read: a 400, not a 500."""
    received = exchange(server, b"POST %s HTTP/1.1\r\nHost: scribe\r\nContent-Type: image/png\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n%s" % (path.encode(), body))
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), received[:300]
    assert b"Content-Type: application/json" in head
    assert b'"the chunked body is malformed"' in rest and b"HTTP/1.1" not in rest  # one answer
    response, _ = generate(server, seed=5, max_chars=20)
    assert response.status_code == 200


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /v1/models?version=" + b"1" * 5000 + b" HTTP/1.1\r\nHost: scribe\r\n\r\n", 414, "uri_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: scribe\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
    (b"qwerty /healthz HTTP/1.1\r\nHost: scribe\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: scribe\r\nContent-Length: -5\r\n\r\n", 400, "bad_request"),
], ids=["request-line-too-long", "header-too-large", "lower-case-method", "negative-length"])
def test_what_gunicorn_refuses_itself_is_a_json_error_too(server, request_bytes, status, code):
    head, _, body = exchange(server, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), head
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]


def test_a_header_line_gunicorn_cannot_parse_is_not_logged(server):
    """An Authorization line that lost its colon still holds the key: gunicorn would log it."""
    secret = "k-never-in-the-log-5b1e"
    head, _, _ = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: scribe\r\nAuthorization Bearer "
                          + secret.encode() + b"\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    time.sleep(0.5)
    log = server.log.read_text()
    assert "Invalid HTTP Header (text not logged)" in log and secret not in log


def test_no_socket_folder_outlives_a_process_that_never_closed_its_gateway(tmp_path):
    """A script or a test that starts the embedded model server and exits without stopping it
    leaves no socket folder behind."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "models").mkdir()
    env = environment_without_scribe_settings()
    script = ("from serving.__main__ import start_embedded_model_server; "
              "from serving.gateway.config import Settings; "
              f"server = start_embedded_model_server(Settings(model_dir={str(tmp_path / 'models')!r})); "
              "import tempfile, pathlib; print(len(list(pathlib.Path(tempfile.gettempdir()).iterdir())))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "TMPDIR": str(tmp_path / "tmp")}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "1"  # its socket folder, while it ran
    assert list((tmp_path / "tmp").iterdir()) == []


def test_no_socket_folder_outlives_its_worker(trained, trained_bard, tmp_path):
    """Each worker's embedded model server listens on a socket in a folder of its own under
    TMPDIR, named after the worker. The arbiter removes it once the worker has gone: killed, or
    stopped with the rest."""
    copy_model_base(trained, tmp_path / "models")
    copy_model_base(trained_bard, tmp_path / "models")
    live = start_gunicorn(tmp_path)
    try:
        [worker] = live.worker_pids()
        [folder] = (tmp_path / "tmp").iterdir()
        assert folder.name.startswith(f"scribe-{worker}-")
        assert (folder / "model-server.sock").is_socket()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while folder.exists():
            assert time.monotonic() < deadline, "the killed worker's socket folder is still there"
            time.sleep(0.1)
        wait_for_readyz(live.url, 200, deadline + 120 - time.monotonic())  # its replacement
    finally:
        live.stop()
    assert live.process.returncode == 0, live.log.read_text()[-3000:]
    assert list((tmp_path / "tmp").iterdir()) == []


def connections_per_worker(server: Gunicorn, established_only: bool = True) -> dict[int, int]:
    """How many client connections each worker holds: the TCP sockets on the gateway's port (all
    of them but the listener, or only the established ones) among its open files (from /proc)."""
    sockets_on_port = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        state = fields[3]  # 01: ESTABLISHED, 0A: LISTEN
        if int(fields[1].split(":")[1], 16) == server.port and state != "0A" \
                and (state == "01" or not established_only):
            sockets_on_port.add(fields[9])
    counts = {}
    for pid in server.worker_pids():
        sockets = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                sockets.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
            except FileNotFoundError:  # closed meanwhile
                pass
        counts[pid] = len(sockets_on_port & sockets)
    return counts


def open_kept_alive(server: Gunicorn, count: int) -> list:
    """`count` clients that connect at once, each ask /healthz and keep their connection open."""
    start = threading.Barrier(count)

    def client(_):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        start.wait()
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200
        response.read()
        return connection

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(client, range(count)))


@pytest.fixture(scope="module")
def two_workers(trained, trained_bard, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-workers")
    copy_model_base(trained, folder / "models")
    copy_model_base(trained_bard, folder / "models")
    live = start_gunicorn(folder, workers=2)
    yield live
    live.stop()


def wait_until_closed(server: Gunicorn) -> None:
    """Until the workers have closed their side of every client connection (and so counted it
    gone): a client's close alone leaves the worker's socket in CLOSE_WAIT until it does."""
    deadline = time.monotonic() + 10
    while sum(connections_per_worker(server, established_only=False).values()):
        assert time.monotonic() < deadline, connections_per_worker(server, established_only=False)
        time.sleep(0.05)


def test_kept_alive_connections_are_shared_evenly_between_workers(two_workers):
    """Clients that keep their connections (a load generator, a proxy's keep-alive pool) stay on
    the worker that accepted them. Left to gunicorn's accept race, 16 opened at once split
    anywhere from 8/8 to 15/1, and the crowded worker's interpreter lock held back the whole
    gateway; each worker now lets a less busy one accept."""
    for _ in range(3):
        connections = open_kept_alive(two_workers, 16)
        try:
            counts = connections_per_worker(two_workers)
            assert sum(counts.values()) == 16, counts
            # 9/7 or closer here; 10/6 allowed for a slower, busier machine (the race gave 15/1).
            assert max(counts.values()) - min(counts.values()) <= 4, counts
        finally:
            for connection in connections:
                connection.close()
        wait_until_closed(two_workers)


def test_a_stalled_worker_does_not_hold_up_new_clients(two_workers):
    """A worker leaves a new connection to one with fewer only for a moment: with the other
    worker frozen (SIGSTOP), every new client is still answered at once, one at a time or in a
    burst (once a wait has run out, the waiting connections are all taken, not one per wait)."""
    wait_until_closed(two_workers)
    # The same burst with both workers running: the bound below is relative to it, so that a
    # slower machine does not fail the test. One 50 ms wait per connection would add 1.2 s.
    started = time.monotonic()
    for connection in open_kept_alive(two_workers, 24):
        connection.close()
    usual_burst = time.monotonic() - started
    wait_until_closed(two_workers)
    frozen, working = two_workers.worker_pids()
    os.kill(frozen, signal.SIGSTOP)
    connections = []
    try:
        for _ in range(6):  # the working worker holds more and more connections than the frozen one
            started = time.monotonic()
            connections += open_kept_alive(two_workers, 1)
            assert time.monotonic() - started < 2, "a new client waited for the frozen worker"
        started = time.monotonic()
        connections += open_kept_alive(two_workers, 24)
        burst = time.monotonic() - started
        assert burst < usual_burst + 0.6, \
            f"24 clients at once took {burst:.2f} s ({usual_burst:.2f} s unfrozen): one wait per connection"
        assert connections_per_worker(two_workers)[working] == 30
    finally:
        os.kill(frozen, signal.SIGCONT)
        for connection in connections:
            connection.close()
    # The thawed worker's embedded model server may answer its first status call late (its
    # timers all fire at once): a 503 for a moment, then ready again.
    wait_for_readyz(two_workers.url, 200, 15)
