"""What serving/gateway/gunicorn_worker.py relies on below gunicorn's public settings, checked
against the installed gunicorn: this fails the day an upgrade changes it, before the gateway
silently loses least-connections accept, client timeouts or its JSON errors. tests/test_overload.py
checks the behaviour itself under load."""

from __future__ import annotations

import inspect
import re

import gunicorn
from conftest import ROOT
from gunicorn import util
from gunicorn.workers import base, gthread

from serving.gateway.gunicorn_worker import ClientTimeoutWorker

# The methods the worker overrides, with the parameters it expects them to take.
OVERRIDDEN = {
    "init_process": ["self"],
    "load_wsgi": ["self"],
    "run": ["self"],
    "set_accept_enabled": ["self", "enabled"],
    "wait_for_and_dispatch_events": ["self", "timeout"],
    "accept": ["self", "listener"],
    "enqueue_req": ["self", "conn"],
    "handle": ["self", "conn"],
}


def test_the_pinned_gunicorn_is_the_one_installed():
    pinned = re.search(r"^gunicorn==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and gunicorn.__version__ == pinned.group(1), (
        "gunicorn changed: check serving/gateway/gunicorn_worker.py against its gthread worker, "
        "then update the pin")


def test_the_gthread_methods_the_worker_overrides_are_still_there():
    for name, parameters in OVERRIDDEN.items():
        theirs = getattr(gthread.ThreadWorker, name)
        assert list(inspect.signature(theirs).parameters) == parameters, name
        assert getattr(ClientTimeoutWorker, name) is not theirs, f"{name} is not overridden"


def test_gthread_keeps_its_count_and_accepting_flag_where_the_worker_reads_them():
    """Least connections: the worker publishes `nr_conns` whenever gthread changes it (a property
    over gthread's own attribute) and reads `_accepting`, which gthread's main loop compares with
    `nr_conns < worker_connections` before calling set_accept_enabled."""
    source = inspect.getsource(gthread.ThreadWorker)
    assert "self.nr_conns = 0" in source and "self._accepting = False" in source
    assert "self.nr_conns += 1" in source and "self.nr_conns -= 1" in source
    assert "can_accept = self.nr_conns < self.worker_connections" in source
    assert "if can_accept != self._accepting:" in source
    accepting = inspect.getsource(gthread.ThreadWorker.set_accept_enabled)
    assert "self._accepting = enabled" in accepting and "self.sockets" in accepting
    assert isinstance(inspect.getattr_static(ClientTimeoutWorker, "nr_conns"), property)


def test_gunicorn_still_writes_its_own_errors_through_util_write_error():
    """The worker replaces util.write_error so that what gunicorn refuses is JSON too: gunicorn
    must look it up on the module at each call."""
    assert list(inspect.signature(util.write_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert "util.write_error(" in inspect.getsource(base.Worker.handle_error)
    assert callable(util.write_nonblock)
