"""gunicorn's gthread worker with least-connections accept and client I/O timeouts.

Both reach into gunicorn's gthread worker below its public settings: its `_accepting` flag, its
`nr_conns` count, and the methods `set_accept_enabled`, `wait_for_and_dispatch_events`,
`accept`, `enqueue_req` and `handle`. gunicorn has no setting for either behaviour, so they live
in this module alone, for the version pinned in constraints.txt; tests/test_gunicorn_worker.py
fails the day gunicorn changes what they rely on. docs/benchmarks.md measures what the balance
is worth.
"""

from __future__ import annotations

import json
import logging
import mmap
import select
import socket
import struct
import time

from gunicorn import util as gunicorn_util
from gunicorn.workers.gthread import ThreadWorker


class ConnectionBalance:
    """Open connections per gunicorn worker, in memory that the arbiter and its workers share.

    Workers take new connections from one shared listening socket, and whichever wakes first takes
    it. A client that keeps its connection (a load generator, a reverse proxy's keep-alive pool)
    stays on the worker that accepted it, and those races can pile most connections onto one
    worker. A worker's requests share its one Python interpreter lock, so the crowded worker holds
    the gateway back while the other idles (docs/benchmarks.md). So a worker that holds more
    connections than another one that is taking connections lets that one accept (least
    connections, as load balancers do). It looks again every RECHECK_SECONDS. If a connection is
    still waiting after MAX_DEFER_SECONDS, the other worker is stalled or dying: this one then
    accepts every waiting connection at once, so a new client waits at most about
    MAX_DEFER_SECONDS."""

    RECHECK_SECONDS = 0.002
    MAX_DEFER_SECONDS = 0.05
    NOT_ACCEPTING = -1  # a free slot, a worker still booting, full, or stopping

    def __init__(self, slots: int):
        self.memory = mmap.mmap(-1, 8 * slots)  # anonymous and shared: inherited by every fork
        self.counts = memoryview(self.memory).cast("q")
        for slot in range(slots):
            self.counts[slot] = self.NOT_ACCEPTING

    def assign(self, arbiter, worker) -> None:
        """gunicorn's pre_fork hook, in the arbiter: give the new worker a free slot (none when
        every slot is taken, as while a reload starts new workers: it then accepts freely)."""
        taken = {getattr(w, "balance_slot", None) for w in arbiter.WORKERS.values()}
        worker.balance_slot = next((s for s in range(len(self.counts)) if s not in taken), None)
        if worker.balance_slot is not None:
            self.counts[worker.balance_slot] = self.NOT_ACCEPTING

    def release(self, worker) -> None:
        if getattr(worker, "balance_slot", None) is not None:
            self.counts[worker.balance_slot] = self.NOT_ACCEPTING

    def fewer_elsewhere(self, slot: int | None, connections: int) -> bool:
        """Whether another worker that is taking connections holds fewer than `connections`."""
        return slot is not None and any(
            0 <= count < connections for other, count in enumerate(self.counts) if other != slot)


class ClientTimeoutWorker(ThreadWorker):
    """gunicorn's gthread worker with a bound on how long a client may stall.

    gthread hands a connection to a thread once its first bytes arrive (one that sends nothing
    goes back to the poller after 5 s), then reads the request and writes the response on a
    blocking socket with no timeout: it calls setblocking(True), which clears any Python socket
    timeout, before every request. A client that sends part of a request and then nothing, or
    stops reading a stream, would hold the thread for good. SO_RCVTIMEO and SO_SNDTIMEO survive
    those calls: each recv or send that makes no progress for SCRIBE_CLIENT_TIMEOUT_SECONDS
    fails, the thread closes the connection, and a stream's generator is closed with it."""

    balance_slot: int | None = None  # set by ConnectionBalance.assign in the arbiter
    resume_accept_at: float | None = None  # while it leaves a new connection to another worker
    deferring_since: float | None = None  # since when a waiting connection has been left
    draining = False  # a wait ran out: accept every waiting connection without looking
    listeners_poll = None

    def init_process(self):
        self.client_timeout = self.app.settings.client_timeout_seconds
        self.balance = self.app.balance
        gunicorn_util.write_error = write_json_error  # what gunicorn itself refuses: JSON too
        self.log.error_log.addFilter(StalledClientLog(self.client_timeout))
        self.log.error_log.addFilter(unlogged_header_text)
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        self.app.before_serving(self)  # GatewayServer: wait for the models, warm up

    def run(self):
        self.log.info("Worker %s is ready and accepting connections", self.pid)
        super().run()

    # Least-connections accept (ConnectionBalance): the worker publishes how many connections it
    # holds whenever that changes, or NOT_ACCEPTING while it takes none.
    @property
    def nr_conns(self) -> int:
        return self._nr_conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        self._nr_conns = value
        self.publish()

    def publish(self) -> None:
        if self.balance_slot is not None:
            taking = self._accepting or self.resume_accept_at is not None
            self.balance.counts[self.balance_slot] = self._nr_conns if taking and self.alive \
                else ConnectionBalance.NOT_ACCEPTING

    def set_accept_enabled(self, enabled):
        """gunicorn's main loop turns accepting on, or off when the worker is full or stopping."""
        if not enabled:
            self.resume_accept_at = self.deferring_since = None
        elif self.resume_accept_at is not None:
            if time.monotonic() < self.resume_accept_at:
                return  # still leaving new connections to a worker with fewer
            self.resume_accept_at = None
        super().set_accept_enabled(enabled)
        self.publish()

    def connection_waiting(self) -> bool:
        """Whether a new connection waits on a listener (the listeners are fixed: one poll object)."""
        if self.listeners_poll is None:
            self.listeners_poll = select.poll()
            for listener in self.sockets:
                self.listeners_poll.register(listener, select.POLLIN)
        return bool(self.listeners_poll.poll(0))

    def wait_for_and_dispatch_events(self, timeout):
        if self.resume_accept_at is not None:
            if self._nr_conns >= self.worker_connections:
                self.resume_accept_at = None  # full: gunicorn turns accepting back on when it is not
                self.publish()
            else:  # wake up in time to look again (at once if that time has come meanwhile)
                timeout = min(timeout, max(0.0, self.resume_accept_at - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        if (self.deferring_since is not None or self.draining) and self.resume_accept_at is None \
                and not self.connection_waiting():
            # Another worker took what this one left or had yet to take: balance the next one.
            self.deferring_since, self.draining = None, False

    def accept(self, listener):
        if not self.draining and self.balance.fewer_elsewhere(self.balance_slot, self._nr_conns):
            now = time.monotonic()
            if self.deferring_since is None:
                self.deferring_since = now
            if now - self.deferring_since < ConnectionBalance.MAX_DEFER_SECONDS:
                self.resume_accept_at = now + ConnectionBalance.RECHECK_SECONDS
                super().set_accept_enabled(False)
                return
            self.draining = True  # the other worker is not taking them
        self.deferring_since = None
        super().accept(listener)
        if self.draining:
            self.draining = self.connection_waiting()

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


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's util.write_error, for the requests gunicorn refuses before the app sees them (a
    request line or headers over its limits, a malformed request line or chunk), in the gateway's
    JSON error form instead of an HTML page."""
    from serving.gateway import errors  # in the worker only: it imports grpc, which must not be forked

    reason = "Not Implemented" if status == 501 else reason  # gunicorn says "Bad Request"
    code = errors.INTERNAL_ERROR if status == 500 else errors.code_of(reason)
    body = json.dumps({"error": {"code": code, "message": message or reason}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


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


def unlogged_header_text(record: logging.LogRecord) -> bool:
    """gunicorn logs the whole text of a header line it cannot parse. `Authorization Bearer <key>`
    without its colon is one: keep the text of such lines out of the log (API keys never are)."""
    message = record.getMessage()
    if "Invalid HTTP Header" in message:
        record.msg = message.split("Invalid HTTP Header", 1)[0] + "Invalid HTTP Header (text not logged)"
        record.args = ()
    return True
