"""Shared fixtures: a tiny real digits model trained once per session, and live servers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from reliability import rss_mb

ROOT = Path(__file__).resolve().parent.parent
SONNETS = Path(__file__).resolve().parent / "data" / "sonnets.txt"
# A models.config that serves digits only (so /readyz needs no bard); %s: more of its fields.
DIGITS_CONFIG = 'model_config_list { config { name: "digits" base_path: "/models/digits" %s } }'
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class TrainedRun:
    model_base: Path
    runs_dir: Path
    result: subprocess.CompletedProcess
    metrics: dict

    @property
    def version_dir(self) -> Path:
        return next(self.model_base.iterdir()) / "1"


def run_training(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedRun:
    """`python -m training digits --profile quick` on the 5,000 shipped digits, pushed once."""
    base = tmp_path_factory.mktemp("models")
    runs = tmp_path_factory.mktemp("runs")
    result = run_training("digits", "--profile", "quick", "--data", "mnist-5k",
                          "--model-base", str(base), "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(next(runs.glob("digits/*/metrics.json")).read_text())
    return TrainedRun(base, runs, result, metrics)


@pytest.fixture(scope="session")
def trained_bard(tmp_path_factory) -> TrainedRun:
    """`python -m training bard --profile quick` on 60 KB of the sonnets, pushed once."""
    base = tmp_path_factory.mktemp("bard-models")
    runs = tmp_path_factory.mktemp("bard-runs")
    result = run_training("bard", "--profile", "quick", "--corpus", str(SONNETS),
                          "--model-base", str(base), "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(next(runs.glob("bard/*/metrics.json")).read_text())
    return TrainedRun(base, runs, result, metrics)


def copy_model_base(trained: TrainedRun, target: Path) -> Path:
    shutil.copytree(trained.model_base, target, dirs_exist_ok=True)
    return target


def predict(gateway, **kwargs) -> requests.Response:
    """POST /v1/digits/predict to a live gateway."""
    return requests.post(gateway.url + "/v1/digits/predict", timeout=30, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_TENSORFLOW = """import sys


class NoTensorFlow:
    \"\"\"As if TensorFlow were not installed, as in the gateway image.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_serving", "keras"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTensorFlow())
"""


def without_tensorflow(folder: Path) -> dict:
    """The environment of a Python process in which TensorFlow cannot be imported."""
    (folder / "sitecustomize.py").write_text(NO_TENSORFLOW)
    return {**os.environ, "PYTHONPATH": str(folder)}


class ModelServerProcess:
    """`python -m serving.model_server` with TF Serving's flags `args`, in a process of its own:
    the one way tests start a standalone model server. It keeps the server's log, and notes when
    its gRPC port was bound and when a version first loaded."""

    def __init__(self, *args: str):
        self.command = [sys.executable, "-m", "serving.model_server", *args]
        self.process = None
        self.bound_at = self.loaded_at = None
        self.log: list[str] = []

    def start(self) -> ModelServerProcess:
        self.bound_at = self.loaded_at = None
        self.process = subprocess.Popen(self.command, cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read_log, args=(self.process,), daemon=True).start()
        return self

    def _read_log(self, process) -> None:
        for line in process.stdout:
            self.log.append(line.rstrip())
            if "serving gRPC on port" in line and self.bound_at is None:  # logged once bound
                self.bound_at = time.monotonic()
            if "loaded version" in line and self.loaded_at is None:
                self.loaded_at = time.monotonic()

    def output(self) -> str:
        return "\n".join(self.log[-40:])

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Until `condition()` holds; fails at once if the server exits. The timeout guards
        against a hang (a server loads in seconds)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, "model server exited:\n" + self.output()
            assert time.monotonic() < deadline, f"{what}\n" + self.output()
            time.sleep(0.05)

    def wait_loaded(self, timeout: float) -> tuple[float, float]:
        """When the gRPC port was bound and when the model had loaded (monotonic)."""
        self.wait_until(lambda: self.loaded_at is not None, timeout, "model server never loaded")
        return self.bound_at, self.loaded_at

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Gunicorn:
    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def worker_rss_mb(self) -> float:
        return round(sum(rss_mb(pid) for pid in self.worker_pids()), 1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))

    def wait_until_idle(self, timeout: float = 15) -> float:
        """Seconds until no generation holds a slot."""
        started = time.monotonic()
        while self.metric("scribe_generations_in_flight") != 0:
            assert time.monotonic() - started < timeout, "generation slots were not given back"
            time.sleep(0.05)
        return time.monotonic() - started


def environment_without_scribe_settings() -> dict[str, str]:
    """This environment minus any SCRIBE_* setting, so that each test sets its own."""
    return {key: value for key, value in os.environ.items() if not key.startswith("SCRIBE_")}


def launch_gateway(folder: Path, env: dict[str, str], workers: int = 1) -> Gunicorn:
    """`python -m serving` with `env` added to this environment (minus its SCRIBE_* settings),
    logging to `folder`/gunicorn.log; returned at once, before it answers."""
    port = free_port()
    env = {**environment_without_scribe_settings(), **env, "PORT": str(port), "SCRIBE_WORKERS": str(workers)}
    log = folder / "gunicorn.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    return Gunicorn(f"http://127.0.0.1:{port}", port, process, log)


def start_gateway(folder: Path, env: dict[str, str], workers: int = 1, timeout: float = 180) -> Gunicorn:
    """launch_gateway, returned once /readyz answers 200 and every worker has booted."""
    live = launch_gateway(folder, env, workers)
    process, log = live.process, live.log
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time\n" + log.read_text()[-3000:]
            try:
                if requests.get(live.url + "/readyz", timeout=10).status_code == 200 \
                        and len(live.worker_pids()) == workers and booted(log, workers):
                    return live
            except requests.RequestException:
                pass
            time.sleep(0.3)
    except BaseException:
        live.stop()
        raise


def booted(log: Path, workers: int) -> bool:
    """Whether every worker has loaded the gateway and takes connections (each logs it)."""
    return log.read_text().count("is ready and accepting connections") >= workers


class LiveGateway:
    """The Flask app from create_app(), served over real HTTP on a loopback port, in front of the
    model server `model_server` names, else of an embedded one started in this process as
    `python -m serving` starts it (`embedded`)."""

    def __init__(self, model_dir: Path, **overrides):
        from werkzeug.serving import make_server

        from serving.__main__ import start_embedded_model_server
        from serving.gateway.app import create_app
        from serving.gateway.config import Settings

        self.settings = Settings(model_dir=str(model_dir), **{"poll_seconds": 0.2, **overrides})
        self.embedded = None
        if not self.settings.model_server:
            self.embedded = start_embedded_model_server(self.settings)
            self.settings = dataclasses.replace(self.settings, model_server=self.embedded.target)
        self.app = create_app(self.settings)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def model_report(self, name: str = "digits") -> dict:
        """The model's entry in GET /v1/models (available, serving_version, versions, ...); {} for a
        model the gateway does not serve."""
        models = requests.get(self.url + "/v1/models", timeout=10).json()["models"]
        return next((m for m in models if m["name"] == name), {})

    def wait_for_model(self, name: str = "digits", timeout: float = 180) -> None:
        """Until `name` is AVAILABLE; the timeout guards against a hang (a load takes seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.model_report(name).get("available"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} did not become available")

    def close(self) -> None:
        self.server.shutdown()
        self.app.extensions["scribe"].close()
        if self.embedded is not None:
            self.embedded.stop()


@pytest.fixture(scope="session")
def gateway(trained, trained_bard, tmp_path_factory):
    """A gateway over both models, with the embedded model server."""
    base = tmp_path_factory.mktemp("gw") / "models"
    copy_model_base(trained, base)
    copy_model_base(trained_bard, base)
    live = LiveGateway(base)
    live.wait_for_model("digits")
    live.wait_for_model("bard")
    yield live
    live.close()


@pytest.fixture(scope="session")
def ladder(trained, trained_bard, tmp_path_factory):
    """`python -m training ladder --profile quick` into a base that has digits and bard already,
    served by one gateway: (the gateway, the model base, the runs folder, the command's output)."""
    from training.ladder import LOWER_RUNGS
    from training.ladder import model_name as ladder_model_name

    base = tmp_path_factory.mktemp("ladder") / "models"
    copy_model_base(trained, base)
    copy_model_base(trained_bard, base)
    runs = base.parent / "runs"
    result = run_training("ladder", "--profile", "quick", "--data", "mnist-5k", "--model-base", str(base),
                          "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    live = LiveGateway(base)
    for rung in LOWER_RUNGS:
        live.wait_for_model(ladder_model_name(rung))
    live.wait_for_model("digits")
    live.wait_for_model("bard")
    yield live, base, runs, result.stdout
    live.close()


def wait_for_readyz(url: str, status: int, timeout: float,
                    request_timeout: float = 10) -> tuple[float, float | None]:
    """Poll /readyz until it answers `status`. Returns when it did, and when it first showed
    the gateway talking to a model server again (an answer other than "model server: ...")."""
    reconnected = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(url + "/readyz", timeout=request_timeout)
        now = time.monotonic()
        reasons = [m.get("reason", "") for m in response.json()["models"]]
        if reconnected is None and not any(r.startswith("model server:") for r in reasons):
            reconnected = now
        if response.status_code == status:
            return now, reconnected
        time.sleep(0.05)
    raise AssertionError(f"/readyz did not answer {status} within {timeout:.0f} s")
