"""The Flask gateway: HTTP in, preprocess, gRPC Predict to the model server, JSON out.

`create_app()` is the application factory (gunicorn: `serving.app:create_app()`). With no
SCRIBE_MODEL_SERVER configured it starts the embedded model server in-process, on a private Unix
socket, so the gateway always talks TF Serving's gRPC API.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from flask import Flask, current_app, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge

from serving.config import (
    EMBEDDED_NEEDS_TENSORFLOW,
    WARM_UP_ENVIRON,
    Settings,
    socket_folder_prefix,
    tensorflow_installed,
)
from serving.errors import RETRY_AFTER_SECONDS, bad_request, register_error_handlers
from serving.metrics import install_metrics
from serving.model_client import ModelClient
from serving.model_server import (
    RunningModelServer,
    read_batching_parameters,
    read_model_config,
    start_model_server,
)
from serving.model_server.batching import DynamicBatcher
from serving.preprocess import sample_drawing
from serving.preprocess import warm_up as warm_up_preprocessing
from serving.security import install_security

log = logging.getLogger("scribe.gateway")
OPENAPI = Path(__file__).with_name("openapi.json")  # the HTTP API as data, served at /openapi.json
WARM_UP_CONNECT_SECONDS = 2.0  # how long the warm-up waits for the model server's channel


class RequestJson(DefaultJSONProvider):
    """Flask's JSON, except that nesting too deep for Python's parser is malformed JSON (a 400)."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:  # e.g. 100,000 opening brackets: not a ValueError, would be a 500
            raise ValueError("JSON nested too deeply") from None


@dataclass
class Gateway:
    settings: Settings
    client: ModelClient
    model_names: list[str]
    digit_calls: DynamicBatcher | None  # coalesces digit requests into shared Predict calls
    embedded: RunningModelServer | None = None

    def close(self) -> None:
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()


def gateway() -> Gateway:
    return current_app.extensions["scribe"]


try:  # gunicorn's request parser errors, raised inside the app when it reads a chunked body
    from gunicorn.http.errors import ParseException as CHUNK_ERRORS
except ImportError:  # another WSGI server (flask run): its own errors
    CHUNK_ERRORS = ()


def past_the_limit(environ: dict) -> bool:
    """Whether a body read up to the limit goes on: one byte more from the WSGI server's stream."""
    try:
        return bool(environ["wsgi.input"].read(1))
    except Exception:  # noqa: BLE001 - the server's own errors: the client went away inside a
        # chunk (OSError), or the end of the body is malformed (gunicorn's ParseException)
        raise bad_request("the chunked body is incomplete or malformed after the size limit") from None


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = RequestJson(app)
    app.json.sort_keys = False
    model_names = [m.name for m in read_model_config(settings.model_config).model_config_list.config]

    embedded = None
    target = settings.model_server
    if not target:
        if not tensorflow_installed():
            raise RuntimeError(EMBEDDED_NEEDS_TENSORFLOW)
        batching = read_batching_parameters(settings.batching_config) if settings.batching_config else None
        # A private Unix socket: gRPC over it costs less CPU per call than over loopback TCP
        # (the port stays open too, for tools and tests).
        socket_folder = tempfile.mkdtemp(prefix=socket_folder_prefix(os.getpid()))
        # Gone when the process ends, closed or not (`flask run`, a script, a test); under
        # gunicorn the arbiter also removes it for a worker that was killed.
        atexit.register(shutil.rmtree, socket_folder, ignore_errors=True)
        socket_path = Path(socket_folder) / "model-server.sock"
        embedded = start_model_server(settings.model_config, {"/models": settings.model_dir},
                                      grpc_port=0, host="127.0.0.1",
                                      poll_seconds=settings.poll_seconds,
                                      intra_op_threads=settings.intra_op_threads,
                                      inter_op_threads=settings.inter_op_threads,
                                      batching=batching, unix_socket=str(socket_path),
                                      warmup_iterations=settings.warmup_iterations)
        target = f"unix:{socket_path}"
        log.info("embedded model server on %s and 127.0.0.1:%d, models from %s", target,
                 embedded.grpc_port, settings.model_dir)
    client = ModelClient(target, settings.model_timeout_seconds)
    register_error_handlers(app)
    install_metrics(app)
    digit_calls = None
    if settings.coalesce_calls > 0:
        # A gRPC call costs the gateway and the model server about 2 ms of CPU here whatever it
        # carries, the CNN about 0.6 ms per image: requests that arrive while this process's
        # digit calls are all in flight share the next call. One that finds a call free goes at
        # once (no timeout): coalescing never waits for company, it only shares under load.
        def call_digits(inputs, pin):
            outputs, served = client.predict(settings.digits_model, inputs, version=pin[0], label=pin[1])
            return {**outputs, "version": np.full(len(inputs["image"]), served)}

        digit_calls = DynamicBatcher(call_digits, {
            "max_batch_size": settings.max_images, "batch_timeout_micros": 0,
            "num_batch_threads": settings.coalesce_calls,
            "max_enqueued_batches": settings.threads + 1,  # never full: each thread waits at most once
        }, "digit-calls", on_batch=app.extensions["requests_per_model_call"].observe)
    app.extensions["scribe"] = Gateway(settings, client, model_names, digit_calls, embedded)
    install_security(app, settings)  # after metrics: refused requests are counted and timed too
    from serving.digits_api import digits
    from serving.text_api import text

    app.register_blueprint(digits)
    app.register_blueprint(text)
    warm_up_preprocessing()  # Pillow's plugin imports and first passes: paid here, not by a user

    @app.get("/")
    def drawing_page():
        return app.send_static_file("index.html")

    @app.before_request
    def chunked_body_within_the_limit():
        """A chunked body has no Content-Length to refuse up front, and werkzeug quietly cuts it at
        the limit: read it here (the handlers get it cached) and refuse it if there is more."""
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            try:
                body = request.get_data()
            except CHUNK_ERRORS:  # a chunk size that is not hex, no CRLF after a chunk, ...
                raise bad_request("the chunked body is malformed") from None
            # At the limit, werkzeug's limited stream refuses any further read, even one that
            # would find the body's end: look one byte past it on the server's own stream.
            if len(body) >= settings.max_body_bytes and past_the_limit(request.environ):
                raise RequestEntityTooLarge()

    openapi = OPENAPI.read_bytes()

    @app.get("/openapi.json")
    def openapi_description():
        return app.response_class(openapi, mimetype="application/json")

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/v1/models")
    def models():
        return jsonify(models=[model_report(name) for name in gateway().model_names])

    @app.get("/readyz")
    def readyz():
        reports = [model_report(name) for name in gateway().model_names]
        ready = all(report["available"] for report in reports)
        response = jsonify(ready=ready, models=reports)
        if not ready:
            response.status_code = 503
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    return app


def warm_up_requests(app: Flask, go_on: Callable[[], bool] = lambda: True) -> None:
    """Send a few requests through this process's own app before it takes connections (python -m
    serving's workers call it): a digits drawing as the page posts it (multipart, RGBA), one as a
    PNG body, and a short streamed generation. The first real request then finds the gRPC channel
    connected and the first-use costs of Flask, the gRPC client and the model server's handlers
    paid: in-process, a worker's first digits request took 12 ms here against 6.5 for the next
    ones without it, 6.6 against 6.1 with it (each sent after a 0.2 s pause).

    The HTTP metrics leave these requests out; the model call and generation metrics count the
    work the model server did for them. An answer other than 200 (a model not available:
    /readyz says why) is logged. The warm-up is skipped when the model server does not accept
    the channel within WARM_UP_CONNECT_SECONDS, stops at the first model timeout (504: the rest
    would wait as long), and stops before any request when `go_on()` says so (the worker was
    told to stop)."""
    gateway = app.extensions["scribe"]
    connected = grpc.channel_ready_future(gateway.client.channel)
    try:
        connected.result(timeout=WARM_UP_CONNECT_SECONDS)
    except grpc.FutureTimeoutError:
        connected.cancel()
        log.warning("warm-up skipped: the model server at %s is not reachable", gateway.client.target)
        return
    client, started = app.test_client(), time.perf_counter()
    sent = [
        ("/v1/digits/predict", {"data": {"image": (io.BytesIO(sample_drawing("RGBA")), "digit.png",
                                                   "image/png")}}),
        ("/v1/digits/predict", {"data": sample_drawing("RGB"), "content_type": "image/png"}),
        ("/v1/text/generate", {"json": {"prompt": "ROMEO:", "max_chars": 8, "seed": 1, "stream": True}}),
    ]
    answered = 0
    for path, body in sent:
        if not go_on():
            return
        # Closed when done: a generation holds one of the process's slots until its response is.
        with client.post(path, environ_overrides={WARM_UP_ENVIRON: True}, **body) as response:
            text = response.get_data(as_text=True)  # a stream runs as it is read
        if response.status_code == 200:
            answered += 1
            continue
        log.info("warm-up: %s answered %d: %s", path, response.status_code, text[:200])
        if response.status_code == 504:
            break
    log.info("warm-up: %d of %d requests answered in %.0f ms", answered, len(sent),
             (time.perf_counter() - started) * 1000)


def model_report(name: str) -> dict:
    """What the model server says about one model: its versions and whether one is AVAILABLE."""
    try:
        versions = gateway().client.status(name)
    except grpc.RpcError as error:
        reason = ("no version loaded" if error.code() == grpc.StatusCode.NOT_FOUND
                  else f"model server: {error.code().name.lower()}")
        return {"name": name, "available": False, "versions": [], "reason": reason}
    available = [v["version"] for v in versions if v["state"] == "AVAILABLE"]
    return {"name": name, "available": bool(available),
            "serving_version": max(available) if available else None, "versions": versions}
