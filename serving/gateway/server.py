"""The gateway under gunicorn: threaded workers configured from Settings, each serving the app
of its `WorkerHooks` (the gateway by default), warmed up before it takes connections."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from serving.gateway.config import EXTENSION, Settings
from serving.gateway.gunicorn_worker import ClientTimeoutWorker, ConnectionBalance


class WorkerHooks:
    """What each worker serves and waits for. By default: the gateway, for the model server
    that SCRIBE_MODEL_SERVER names (python -m serving gives the embedded one its own hooks)."""

    def load(self, settings: Settings) -> Any:
        """The WSGI app, built in the worker (never forked: gRPC and TensorFlow must not be)."""
        from serving.gateway.app import create_app

        return create_app(settings)

    def wait_until_ready(self, worker) -> None:
        """In the worker, before it takes connections; `worker.notify()` while waiting long."""

    def worker_exited(self, worker) -> None:
        """In the arbiter, once a worker has gone however it went."""


class GatewayServer(BaseApplication):
    """gunicorn, configured from Settings, serving `hooks.load(settings)` in each worker."""

    def __init__(self, settings: Settings, hooks: WorkerHooks | None = None):
        self.settings, self.hooks = settings, hooks or WorkerHooks()
        # Room for the workers a reload (HUP) or TTIN starts while the old ones stop; a worker
        # that finds no free slot accepts as gunicorn's own workers do.
        self.balance = ConnectionBalance(max(64, 4 * settings.workers))
        super().__init__()

    def child_exit(self, _arbiter, worker) -> None:
        """gunicorn's child_exit hook, in the arbiter: a worker has gone, however it went."""
        self.balance.release(worker)
        self.hooks.worker_exited(worker)

    def load_config(self):
        s = self.settings
        self.cfg.set("bind", f"{s.host}:{s.port}")
        self.cfg.set("workers", s.workers)
        self.cfg.set("threads", s.threads)
        self.cfg.set("worker_class", ClientTimeoutWorker)  # gthread, with client I/O timeouts
        self.cfg.set("timeout", 120)  # loading TensorFlow and the models takes a while
        self.cfg.set("graceful_timeout", 20)
        self.cfg.set("accesslog", "-")
        self.cfg.set("pre_fork", self.balance.assign)
        self.cfg.set("child_exit", self.child_exit)

    def load(self):
        return self.hooks.load(self.settings)

    def before_serving(self, worker) -> None:
        """In each worker, once its app is loaded: wait for what the hooks wait for, then send the
        gateway's warm-up requests through it, telling the arbiter the worker is alive between
        them. The warm-up is an optional speed-up: should it fail, the worker serves anyway (an
        exception here would stop the whole server, as a worker that cannot boot does)."""
        self.hooks.wait_until_ready(worker)
        if not worker.alive or EXTENSION not in getattr(worker.wsgi, "extensions", {}):
            return  # told to stop meanwhile, or not the gateway (bench/floor_app.py)
        from serving.gateway.app import warm_up_requests

        def go_on() -> bool:
            worker.notify()
            return worker.alive

        try:
            warm_up_requests(worker.wsgi, go_on)
        except Exception:  # noqa: BLE001 - logged; the worker serves without the warm-up
            worker.log.exception("Worker %s: warm-up failed; taking connections anyway", worker.pid)
