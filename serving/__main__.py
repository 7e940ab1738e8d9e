"""python -m serving: run the gateway under gunicorn (threaded workers), configured from the
environment (see serving/config.py and the README's configuration table)."""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from serving.config import Settings, socket_folder_prefix


class ClientTimeoutWorker(ThreadWorker):
    """gunicorn's gthread worker with a bound on how long a client may stall.

    gthread hands a connection to a thread once its first bytes arrive (one that sends nothing
    goes back to the poller after 5 s), then reads the request and writes the response on a
    blocking socket with no timeout: it calls setblocking(True), which clears any Python socket
    timeout, before every request. A client that sends part of a request and then nothing, or
    stops reading a stream, would hold the thread for good. SO_RCVTIMEO and SO_SNDTIMEO survive
    those calls: each recv or send that makes no progress for SCRIBE_CLIENT_TIMEOUT_SECONDS
    fails, the thread closes the connection, and a stream's generator is closed with it."""

    def init_process(self):
        self.client_timeout = self.app.settings.client_timeout_seconds
        self.log.error_log.addFilter(StalledClientLog(self.client_timeout))
        super().init_process()

    def enqueue_req(self, conn):
        if not conn.initialized:  # a new connection: the options stay for its lifetime
            seconds, fraction = divmod(self.client_timeout, 1)
            timeval = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        super().enqueue_req(conn)

    def handle(self, conn):
        keep = super().handle(conn)
        if keep is False:
            # gthread closes the connection in its main loop, lingering up to 2 s for a client
            # that neither sends nor closes: a handful of stalled clients would stop it from
            # accepting anyone else. Linger here, in this connection's thread, instead.
            linger(conn.sock)
        return keep


def linger(sock: socket.socket, seconds: float = 2.0) -> None:
    """gunicorn's graceful close (util.close_graceful) without the close: send FIN, read what
    the client still sends until it closes (so that closing does not reset the connection and
    cut off the response), then shut the read side, so the final close does not wait again."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                break
    except OSError:  # timed out, reset or closed already: nothing more to wait for
        pass
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class StalledClientLog(logging.Filter):
    """gthread logs a timed-out recv or send (EAGAIN on a blocking socket) as a socket error with
    a traceback; for a stalled client one line is enough."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError):
            record.msg, record.args = "closed a client stalled for %ss", (self.timeout,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def remove_socket_folder(_arbiter, worker) -> None:
    """In the arbiter, once a worker has gone however it went (stopped, killed or crashed):
    remove the private folder of its embedded model server's socket."""
    for folder in Path(tempfile.gettempdir()).glob(socket_folder_prefix(worker.pid) + "*"):
        shutil.rmtree(folder, ignore_errors=True)


class GatewayServer(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        s = self.settings
        self.cfg.set("bind", f"{s.host}:{s.port}")
        self.cfg.set("workers", s.workers)
        self.cfg.set("threads", s.threads)
        self.cfg.set("worker_class", ClientTimeoutWorker)  # gthread, with client I/O timeouts
        self.cfg.set("timeout", 120)  # loading TensorFlow and the models takes a while
        self.cfg.set("graceful_timeout", 20)
        self.cfg.set("accesslog", "-")
        self.cfg.set("child_exit", remove_socket_folder)

    def load(self):
        from serving.app import create_app  # in the worker: TensorFlow is never forked

        return create_app(self.settings)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    if not 0 < settings.client_timeout_seconds < 86_400:  # 0 would turn the kernel's timeout off
        raise SystemExit("SCRIBE_CLIENT_TIMEOUT_SECONDS must be above 0 and below a day")
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    print(f"Scribe gateway on http://{host}:{settings.port}", flush=True)
    GatewayServer(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
