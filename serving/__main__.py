"""python -m serving: the gateway under gunicorn, configured from the environment
(serving/gateway/config.py). With SCRIBE_MODEL_SERVER set, the gateway calls that model server
(TF Serving, as in docker-compose.yml). Without it, each gateway worker starts the embedded
model server in its own process, on a private Unix socket, before it loads the gateway: gRPC
over a Unix socket within the process costs less CPU per call than over TCP to another process.

The one module that knows both programs: the gateway is only ever handed an address.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from serving.gateway.config import Settings, channel_target
from serving.gateway.server import GatewayServer, WorkerHooks

EMBEDDED_NEEDS_TENSORFLOW = (
    "SCRIBE_MODEL_SERVER is not set, so the gateway would start the embedded model server, which "
    "needs TensorFlow: install scribe[tensorflow] (make install does), or set SCRIBE_MODEL_SERVER to "
    "a TF Serving gRPC host:port")
FIRST_LOAD_WAIT_SECONDS = 300  # the longest a worker waits for its embedded models to load


def tensorflow_installed() -> bool:
    """Whether TensorFlow and TF Serving's API package, which the embedded model server runs on,
    can be imported (checked without importing them)."""
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("tensorflow", "tensorflow_serving"))
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def socket_folder_prefix(pid: int) -> str:
    """How the private folder under TMPDIR that holds a process's embedded model server socket is
    named: after the process, so that gunicorn's arbiter can remove it once the worker has gone."""
    return f"scribe-{pid}-"


def start_embedded_model_server(settings: Settings):
    """The embedded model server in this process, configured from `settings`, on a private Unix
    socket (and a loopback port, for tools and tests). Returns the RunningModelServer; its
    `target` is the address to hand the gateway."""
    from serving.model_server import start_model_server
    from serving.tfserving.configs import read_batching_parameters

    batching = read_batching_parameters(settings.batching_config) if settings.batching_config else None
    socket_folder = tempfile.mkdtemp(prefix=socket_folder_prefix(os.getpid()))
    # Gone when the process ends, stopped or not; under gunicorn the arbiter also removes it for a
    # worker that was killed.
    atexit.register(shutil.rmtree, socket_folder, ignore_errors=True)
    server = start_model_server(settings.model_config, {"/models": settings.model_dir},
                                grpc_port=0, host="127.0.0.1", poll_seconds=settings.poll_seconds,
                                intra_op_threads=settings.intra_op_threads,
                                inter_op_threads=settings.inter_op_threads, batching=batching,
                                grpc_socket_path=str(Path(socket_folder) / "model-server.sock"),
                                warmup_iterations=settings.warmup_iterations)
    logging.getLogger("scribe").info("embedded model server on %s and 127.0.0.1:%d, models from %s",
                                     server.target, server.grpc_port, settings.model_dir)
    return server


class EmbeddedModelServer(WorkerHooks):
    """Each worker: its own embedded model server, then the gateway handed its address."""

    server = None  # the worker's RunningModelServer, once loaded

    def load(self, settings: Settings):
        self.server = start_embedded_model_server(settings)
        return super().load(dataclasses.replace(settings, model_server=self.server.target))

    def wait_until_ready(self, worker) -> None:
        """A worker takes connections only once its model server has made its first pass over
        the model folders: each version there loaded and warmed up, or failed. Before, a request
        could reach a worker whose models were still loading, and get a 503 right after another
        worker had answered /readyz with 200. Meanwhile the worker tells the arbiter it is alive;
        after FIRST_LOAD_WAIT_SECONDS it takes connections anyway, and /readyz says what is
        missing."""
        deadline = time.monotonic() + FIRST_LOAD_WAIT_SECONDS
        while not self.server.manager.first_poll_done.wait(0.5):
            if not worker.alive:  # told to stop meanwhile (SIGTERM)
                return
            worker.notify()
            if time.monotonic() > deadline:
                worker.log.warning("Worker %s: models still loading after %d s; taking connections",
                                   worker.pid, FIRST_LOAD_WAIT_SECONDS)
                return

    def worker_exited(self, worker) -> None:
        """Remove the private folder of the worker's socket, however the worker went."""
        for folder in Path(tempfile.gettempdir()).glob(socket_folder_prefix(worker.pid) + "*"):
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    if not 0 < settings.client_timeout_seconds < 86_400:  # 0 would turn the kernel's timeout off
        raise SystemExit("SCRIBE_CLIENT_TIMEOUT_SECONDS must be above 0 and below a day")
    hooks = None
    if settings.model_server:
        try:
            channel_target(settings.model_server)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    elif not tensorflow_installed():
        raise SystemExit(EMBEDDED_NEEDS_TENSORFLOW)
    else:
        hooks = EmbeddedModelServer()
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    print(f"Scribe gateway on http://{host}:{settings.port}", flush=True)
    GatewayServer(settings, hooks).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
