"""python -m serving: run the gateway under gunicorn (threaded workers), configured from the
environment (see serving/config.py and the README's configuration table)."""

from __future__ import annotations

import logging
import sys

from gunicorn.app.base import BaseApplication

from serving.config import Settings


class GatewayServer(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        s = self.settings
        self.cfg.set("bind", f"{s.host}:{s.port}")
        self.cfg.set("workers", s.workers)
        self.cfg.set("threads", s.threads)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("timeout", 120)  # loading TensorFlow and the models takes a while
        self.cfg.set("graceful_timeout", 20)
        self.cfg.set("accesslog", "-")

    def load(self):
        from serving.app import create_app  # in the worker: TensorFlow is never forked

        return create_app(self.settings)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    print(f"Scribe gateway on http://{host}:{settings.port}", flush=True)
    GatewayServer(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
