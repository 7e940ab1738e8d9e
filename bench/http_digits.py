"""Digits over HTTP under load (wrk), against baselines measured in the same run.

For concurrency 1, 4, 16 and 64, a 280x280 PNG drawing as the body, requests per second and
p50/p90/p99 latency for:
  a. the Scribe gateway under gunicorn with the embedded model server, batching on and off, and
     with the gateway's coalescing of concurrent requests into shared Predict calls off;
  b. the tutorial baseline: Flask calling Keras `model.predict` per request (same model);
  c. the floor: the gateway's server stack decoding and preprocessing the image, answering
     without a model.
Also the gateway's cold start (process start to /readyz 200), its first requests after it
against the next hundred and against requests after an idle pause, the same once a new version
of each model has been pushed while it serves (with the version's warmup records, and without
them), and
the peak memory (RSS of the whole gunicorn process tree) at 64 concurrent clients; and, since
each of those gateway workers holds its own embedded model server, the peak memory of the
gateway and of the model server apart, as docker-compose.yml runs them: the model server in its
own process with compose's flags, the gateway calling it over TCP (one pass of wrk at 64
clients).

All the servers run side by side for the whole benchmark and are measured in --rounds
interleaved rounds, each in a different order. Every figure is the median of its rounds, and
each ratio the median of the ratios within each round.

    python bench/http_digits.py [--model-base models] [--seconds 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import requests

from serving.gateway.model_client import ModelClient
from serving.gateway.preprocess import sample_drawing
from serving.model_server.__main__ import compose_command_line
from serving.tfserving.versions import WARMUP_FILE, latest_version
from training.push import push_version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONCURRENCY = (1, 4, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (those still alive)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process has ended
        found.append(current)
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended meanwhile
    return found


def rss_tree_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    for current in process_tree(pid):
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{current}/status").read_text()).group(1))
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue
    return total / 1024


def cpu_tree_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by a process and its descendants: those alive, and
    those ended and reaped, which their parent's cutime and cstime count."""
    ticks = 0
    for current in process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


IDLE_TIMEOUT_SECONDS = 60  # the longest the benchmark waits for a server to go idle


def wait_until_idle(pid: int, window: float = 0.3, busy: float = 0.05,
                    timeout: float = IDLE_TIMEOUT_SECONDS) -> float | None:
    """Wait until a server's process tree uses under `busy` of a core over `window` seconds, and
    return how long it stayed busy (seconds, not counting the quiet window), or None if it was
    still busy after `timeout`. When wrk stops, a server may still be working through requests
    it had queued: Keras's sync workers keep 1.5 to 2 cores busy for about 0.5 s after 16 clients
    and 2 s after 64. Measured next without this wait, a server would share the machine with
    that."""
    started = time.monotonic()
    before = cpu_tree_seconds(pid)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = cpu_tree_seconds(pid)
        if 0 <= now - before < busy * window:
            return max(0.0, time.monotonic() - started - window)
        before = now
    print(f"warning: process {pid} still busy after {timeout:g} s; measuring on", file=sys.stderr, flush=True)
    return None


class PeakMemory:
    """Samples the RSS of a process tree every 0.2 s while in the `with` block."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_tree_mb(self.pid))
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def wrk(url: str, connections: int, seconds: float, body_file: Path) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(ROOT / "bench" / "post_png.lua"), url],
        capture_output=True, text=True, env={**os.environ, "BODY_FILE": str(body_file)}, timeout=seconds + 60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    line = lines[0]
    result = json.loads(line[len("RESULT "):])
    result["rps"] = round(result["requests"] / result["seconds"], 1)
    return result


class Server:
    def __init__(self, name: str, command: list[str], env: dict, port: int):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    def wait_until_answering(self, body: bytes, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited"
            try:
                response = requests.post(self.url + "/v1/digits/predict", data=body, timeout=5,
                                         headers={"Content-Type": "image/png"})
                if response.status_code == 200:
                    return time.monotonic() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer")

    def wait_until_ready(self, timeout: float = 180) -> float | None:
        """Seconds from process start to /readyz 200 (every configured model AVAILABLE)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited"
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        """Stop the server's whole process group; one that is already gone is fine."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def measure_apart(model_base: Path, gateway_env: dict, body: bytes, body_file: Path,
                  seconds: float) -> dict:
    """Peak RSS of the gateway and of the model server, each on its own, at 64 clients: the
    model server as its own process with the command line of docker-compose.yml's tfserving
    service, the gateway's workers calling it over TCP, as the compose gateway calls
    tfserving:8500. Also the gateway's own cold start there: from starting it, with the model
    server already serving both models, to its /readyz 200."""
    grpc_port, rest_port, port = free_port(), free_port(), free_port()
    gateway_env = {**gateway_env, "PORT": str(port), "SCRIBE_MODEL_SERVER": f"127.0.0.1:{grpc_port}"}
    servers = []
    try:
        model_server = Server("model server", [
            sys.executable, "-m", "serving.model_server", *compose_command_line(grpc_port, rest_port),
            f"--base_path_map=/models={model_base.resolve()}"], {"TF_CPP_MIN_LOG_LEVEL": "2"}, grpc_port)
        servers.append(model_server)
        deadline = time.monotonic() + 180
        client = ModelClient(f"127.0.0.1:{grpc_port}", timeout=5)
        try:
            while not all(model_available(client, name) for name in ("digits", "bard")):
                assert model_server.process.poll() is None and time.monotonic() < deadline, "no model server"
                time.sleep(0.1)
        finally:
            client.close()
        gateway = Server("gateway apart", [sys.executable, "-m", "serving"], gateway_env, port)
        servers.append(gateway)
        gateway_start = gateway.wait_until_ready()
        gateway.wait_until_answering(body)
        wrk(gateway.url + "/v1/digits/predict", 4, 2, body_file)  # warm every worker
        with PeakMemory(gateway.process.pid) as gateway_memory, \
                PeakMemory(model_server.process.pid) as server_memory:
            point = wrk(gateway.url + "/v1/digits/predict", CONCURRENCY[-1], seconds, body_file)
    finally:
        for server in servers:
            server.stop()
    return {"gateway_seconds_to_readyz": gateway_start and round(gateway_start, 2),
            "connections": CONCURRENCY[-1], "gateway_peak_rss_mb": round(gateway_memory.peak, 1),
            "model_server_peak_rss_mb": round(server_memory.peak, 1), **point}


def model_available(client: ModelClient, name: str) -> bool:
    """Whether the model server reports a version of `name` AVAILABLE (GetModelStatus)."""
    try:
        return any(v["state"] == "AVAILABLE" for v in client.status(name))
    except grpc.RpcError:  # not listening yet, or the model not known yet
        return False


FOLLOWING = 100
AFTER_IDLE, IDLE_SECONDS = 10, 0.2


def first_requests(url: str, body: bytes) -> dict:
    """Milliseconds for the first digits request after /readyz 200 (or after new versions
    began serving), then for the first generation, each on a new connection, against the median
    and the slowest of the FOLLOWING after each (a worker that had not answered yet takes some of
    those: its own first one is among them), and against the median of AFTER_IDLE more, each
    after IDLE_SECONDS with nothing to do. The first request of each model is sent after such a
    pause too: on this machine any request after a pause of 50 ms or more is slower than one
    right after another, so it is the requests after a pause that show whether the start-up (or
    the load) left work for the first one."""
    calls = {
        "digits": lambda: requests.post(url + "/v1/digits/predict", data=body, timeout=30,
                                        headers={"Content-Type": "image/png"}),
        "generation of 100 characters": lambda: requests.post(
            url + "/v1/text/generate", json={"prompt": "ROMEO:", "max_chars": 100, "seed": 1}, timeout=30),
    }

    def timed(name: str, call) -> float:
        started = time.perf_counter()
        response = call()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {response.status_code} {response.text[:300]}")
        return elapsed

    figures = {}
    for name, call in calls.items():
        time.sleep(IDLE_SECONDS)
        times = [timed(name, call) for _ in range(1 + FOLLOWING)]
        after_idle = []
        for _ in range(AFTER_IDLE):
            time.sleep(IDLE_SECONDS)
            after_idle.append(timed(name, call))
        following = times[1:]
        figures[name] = {"first_ms": round(times[0], 1),
                         "following_median_ms": round(statistics.median(following), 1),
                         "following_slowest_ms": round(max(following), 1),
                         "after_idle_median_ms": round(statistics.median(after_idle), 1)}
    return figures


def push_next_versions(models: Path, records: bool) -> dict[str, int]:
    """Push a copy of each model's newest version as its next one, with or without its warmup
    records, as a training job pushes (training/push.py: staged, then renamed into place).
    Returns each model's new version."""
    pushed = {}
    with tempfile.TemporaryDirectory() as scratch:
        for base in sorted(path for path in models.iterdir() if path.is_dir()):
            export = base / str(latest_version(base))
            if not records:
                export = Path(shutil.copytree(export, Path(scratch) / base.name,
                                              ignore=shutil.ignore_patterns(WARMUP_FILE.name)))
            pushed[base.name] = push_version(export, base)
    return pushed


SERVING_CHECKS = 20  # answers in a row, each on a new connection, that must show the new versions


def wait_until_serving(url: str, versions: dict[str, int], timeout: float = 120) -> None:
    """Wait until SERVING_CHECKS answers of /v1/models in a row, each on a new connection (so
    from either worker: each has its own embedded model server, which loads the version itself),
    name `versions` as the ones serving."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < SERVING_CHECKS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"versions {versions} not serving after {timeout:g} s")
        models = requests.get(url + "/v1/models", timeout=10).json()["models"]
        serving = {m["name"]: m["serving_version"] for m in models if m["name"] in versions}
        in_a_row = in_a_row + 1 if serving == versions else 0
        time.sleep(0.05)


def gunicorn(app: str, port: int) -> list[str]:
    """The baseline as tutorials run it: `gunicorn -w 2 app`, gunicorn's default sync workers.
    Measured against 2 gthread workers of 16 threads, the sync workers served 8 to 10% more
    (their one request at a time does not share the interpreter with 15 others' predict calls)."""
    return [str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "--timeout", "120", app]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http_digits.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be at least 1")
    versions = sorted((args.model_base / "digits").glob("[0-9]*/saved_model.pb"))
    if not versions:
        print(f"no digits version under {args.model_base}: run `make train` first", file=sys.stderr)
        return 1
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 1
    body = sample_drawing()
    body_file = Path(tempfile.mkdtemp()) / "drawing.png"
    body_file.write_bytes(body)
    gateway_env = {"SCRIBE_MODEL_DIR": str(args.model_base.resolve()), "SCRIBE_WORKERS": "2",
                   "SCRIBE_THREADS": "16", "SCRIBE_HOST": "127.0.0.1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    setups = [
        ("scribe, batching on", [sys.executable, "-m", "serving"], gateway_env),
        ("scribe, batching off", [sys.executable, "-m", "serving"],
         {**gateway_env, "SCRIBE_BATCHING_CONFIG": ""}),
        ("scribe, coalescing off", [sys.executable, "-m", "serving"],
         {**gateway_env, "SCRIBE_COALESCE_CALLS": "0"}),
        ("keras predict baseline", gunicorn("bench.baseline_keras_app:create_app()", 0),
         {"SCRIBE_BENCH_MODEL": str(versions[-1].parent), "TF_CPP_MIN_LOG_LEVEL": "2"}),
        ("floor (no model)", [sys.executable, "-m", "bench.floor_app"], gateway_env),
    ]
    results = {"benchmark": "http_digits", "seconds_per_point": args.seconds, "rounds": args.rounds,
               "servers": {}}
    # Every server runs for the whole benchmark, and the rounds interleave them (each round in a
    # different order): a busy spell on this shared machine then hits every server alike, and
    # each figure is the median of its rounds.
    servers = []
    try:
        for name, command, env in setups:
            port = free_port()
            if command[0] == sys.executable:
                env = {**env, "PORT": str(port)}
            else:
                command = [c if not c.startswith("127.0.0.1:") else f"127.0.0.1:{port}" for c in command]
            servers.append(Server(name, command, env, port))
        for server in servers:
            server.wait_until_answering(body)
            wrk(server.url + "/v1/digits/predict", 4, 2, body_file)  # warm every worker
            wait_until_idle(server.process.pid)
        rounds = {server.name: {c: [] for c in CONCURRENCY} for server in servers}
        peaks = {server.name: 0.0 for server in servers}
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for connections in CONCURRENCY:
                for server in order:
                    with PeakMemory(server.process.pid) as memory:
                        point = wrk(server.url + "/v1/digits/predict", connections, args.seconds, body_file)
                    if connections == CONCURRENCY[-1]:
                        peaks[server.name] = max(peaks[server.name], memory.peak)
                    busy_after = wait_until_idle(server.process.pid)
                    point["busy_after_seconds"] = None if busy_after is None else round(busy_after, 1)
                    rounds[server.name][connections].append(point)
                    print(f"round {r + 1} {server.name:24s} c={connections:<3d} {point['rps']:9.1f} req/s  "
                          f"p50 {point['p50_ms']:7.2f} ms  p99 {point['p99_ms']:7.2f} ms  "
                          f"errors {point['errors'] + point['non2xx']}  then busy "
                          + (f"over {IDLE_TIMEOUT_SECONDS} s" if busy_after is None
                             else f"{busy_after:.1f} s"), flush=True)
    finally:
        for server in servers:
            server.stop()
    for name, by_connections in rounds.items():
        points = {c: {**{key: statistics.median(p[key] for p in runs)
                         for key in ("rps", "p50_ms", "p90_ms", "p99_ms")},
                      "errors": sum(p["errors"] + p["non2xx"] for p in runs), "rounds": runs}
                  for c, runs in by_connections.items()}
        results["servers"][name] = {"peak_rss_mb": round(peaks[name], 1), "points": points}

    # Cold start: process start to /readyz 200 (every configured model AVAILABLE), then the first
    # requests against the next ones; then the same once a new version of each model has been
    # pushed while serving, with its warmup records and without them, to show what those are
    # worth: at a cold start each worker's own warm-up requests (serving/gateway/app.py) reach the
    # model first, but a version loaded while serving meets the first user's request directly.
    # A failure here is reported, and the figures above are still written.
    failed = False
    results["first_requests"] = {}
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        shutil.copytree(args.model_base, models)  # a copy: the new versions are pushed into it
        port = free_port()
        env = {**gateway_env, "PORT": str(port), "SCRIBE_MODEL_DIR": str(models)}
        server = Server("cold start", [sys.executable, "-m", "serving"], env, port)
        key = "cold start"
        try:
            cold = server.wait_until_ready()
            results["cold_start_seconds_to_readyz"] = None if cold is None else round(cold, 2)
            if cold is None:
                raise TimeoutError("/readyz did not answer 200 in time")
            results["first_requests"][key] = first_requests(server.url, body)
            for records in (True, False):
                key = "new version, " + ("warmup records" if records else "no warmup records")
                wait_until_serving(server.url, push_next_versions(models, records))
                results["first_requests"][key] = first_requests(server.url, body)
        except Exception as error:  # noqa: BLE001 - reported, and the run's figures kept
            results["first_requests"][key], failed = {"error": repr(error)}, True
        finally:
            server.stop()
    try:
        results["apart"] = measure_apart(args.model_base, gateway_env, body, body_file, args.seconds)
    except Exception as error:  # noqa: BLE001 - reported, and the run's figures kept
        results["apart"], failed = {"error": repr(error)}, True

    s = results["servers"]
    at16 = {name: s[name]["points"][16] for name in s}
    gateway = at16["scribe, batching on"]

    def by_round(baseline: str) -> list[float]:
        """The gateway's throughput over the baseline's in each round: pairs measured minutes
        apart at most, so a slow spell of the machine weighs on both sides of each ratio."""
        return [g["rps"] / b["rps"] for g, b in zip(gateway["rounds"], at16[baseline]["rounds"], strict=True)]

    keras, floor = by_round("keras predict baseline"), by_round("floor (no model)")
    results["ratios_at_16"] = {  # medians of the per-round ratios
        "gateway_vs_keras_predict": round(statistics.median(keras), 1),
        "gateway_vs_floor": round(statistics.median(floor), 3),
        "gateway_p99_ms": gateway["p99_ms"],
        "gateway_vs_keras_predict_by_round": [round(r, 1) for r in keras],
        "gateway_vs_floor_by_round": [round(r, 3) for r in floor],
    }
    print(f"\nmedians of {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'server':24s} " + " ".join(f"{'c=' + str(c):>9s}" for c in CONCURRENCY)
          + "   p50 / p99 at c=16   peak RSS at c=64")
    for name, server in s.items():
        at = server["points"]
        print(f"{name:24s} " + " ".join(f"{at[c]['rps']:9.1f}" for c in CONCURRENCY)
              + f"   {at[16]['p50_ms']:6.1f} / {at[16]['p99_ms']:6.1f} ms   {server['peak_rss_mb']:8.0f} MB")
    print(json.dumps(results["ratios_at_16"]), "cold start:", results["cold_start_seconds_to_readyz"], "s")
    for key, figures in results["first_requests"].items():
        print(f"first requests, {key}: " + ("; ".join(
            f"{name} {f['first_ms']:.1f} ms (the next {FOLLOWING}: median {f['following_median_ms']:.1f}, "
            f"slowest {f['following_slowest_ms']:.1f}; after {IDLE_SECONDS:g} s idle: median "
            f"{f['after_idle_median_ms']:.1f})" for name, f in figures.items())
            if "error" not in figures else f"FAILED: {figures['error']}"))
    apart = results["apart"]
    if "error" in apart:
        print(f"apart, as in docker-compose: FAILED: {apart['error']}")
    else:
        print(f"apart, as in docker-compose: the gateway's /readyz 200 after "
              f"{apart['gateway_seconds_to_readyz']} s; at c=64 (one pass): "
              f"gateway {apart['gateway_peak_rss_mb']:.0f} MB, "
              f"model server {apart['model_server_peak_rss_mb']:.0f} MB, "
              f"{apart['rps']:.1f} req/s, p99 {apart['p99_ms']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
