"""The Flask gateway: HTTP in, preprocess, gRPC Predict to a model server, JSON out.

`create_app()` is the application factory (gunicorn: `serving.gateway.app:create_app()`). It is
handed the model server's gRPC address (SCRIBE_MODEL_SERVER) and never starts one: `python -m
serving` starts the embedded one where none is given.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable

import grpc
from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import RequestEntityTooLarge

from serving.gateway.config import EXTENSION, NEEDS_A_MODEL_SERVER, WARM_UP_ENVIRON, Settings
from serving.gateway.errors import bad_request, register_error_handlers
from serving.gateway.metrics import ModelMetrics, install_http_metrics
from serving.gateway.preprocess import sample_drawing
from serving.gateway.preprocess import warm_up as warm_up_preprocessing
from serving.gateway.security import install_security
from serving.gateway.state import Gateway
from serving.tfserving.configs import read_model_config

log = logging.getLogger("scribe.gateway")
WARM_UP_CONNECT_SECONDS = 2.0  # how long the warm-up waits for the model server's channel


class RequestJson(DefaultJSONProvider):
    """Flask's JSON, except that nesting too deep for Python's parser is malformed JSON (a 400)."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:  # e.g. 100,000 opening brackets: not a ValueError, would be a 500
            raise ValueError("JSON nested too deeply") from None


try:  # gunicorn's request parser errors, raised inside the app when it reads a chunked body
    from gunicorn.http.errors import ParseException as CHUNK_ERRORS
except ImportError:  # another WSGI server (flask run): its own errors
    CHUNK_ERRORS = ()


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    if not settings.model_server:
        raise ValueError(NEEDS_A_MODEL_SERVER)
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = RequestJson(app)
    app.json.sort_keys = False
    registry = CollectorRegistry()  # one per app, so several apps can live in one process
    model_names = [m.name for m in read_model_config(settings.model_config).model_config_list.config]
    app.extensions[EXTENSION] = Gateway.connect(settings, model_names, ModelMetrics.create(registry))
    log.info("model server at %s", settings.model_server)

    register_error_handlers(app)
    install_http_metrics(app, registry)
    install_security(app, settings)  # after metrics: refused requests are counted and timed too
    app.before_request(lambda: refuse_chunked_bodies_over(settings.max_body_bytes))
    from serving.gateway.digits_api import digits
    from serving.gateway.status_api import status
    from serving.gateway.text_api import text

    for blueprint in (status, digits, text):
        app.register_blueprint(blueprint)
    warm_up_preprocessing()  # Pillow's and OpenCV's first passes: paid here, not by a user
    return app


def refuse_chunked_bodies_over(limit: int) -> None:
    """A chunked body has no Content-Length to refuse up front, and werkzeug quietly cuts it at
    the limit: read it here (the handlers get it cached) and refuse it if there is more."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        try:
            body = request.get_data()
        except CHUNK_ERRORS:  # a chunk size that is not hex, no CRLF after a chunk, ...
            raise bad_request("the chunked body is malformed") from None
        # At the limit, werkzeug's limited stream refuses any further read, even one that
        # would find the body's end: look one byte past it on the server's own stream.
        if len(body) >= limit and past_the_limit(request.environ):
            raise RequestEntityTooLarge()


def past_the_limit(environ: dict) -> bool:
    """Whether a body read up to the limit goes on: one byte more from the WSGI server's stream."""
    try:
        return bool(environ["wsgi.input"].read(1))
    except Exception:  # noqa: BLE001 - the server's own errors: the client went away inside a
        # chunk (OSError), or the end of the body is malformed (gunicorn's ParseException)
        raise bad_request("the chunked body is incomplete or malformed after the size limit") from None


def warm_up_requests(app: Flask, go_on: Callable[[], bool] = lambda: True) -> None:
    """Send a few requests through this process's own app before it takes connections (python -m
    serving's workers call it): a digits drawing as the page posts it (multipart, RGBA), one as a
    PNG body, and a short streamed generation. The first real request then finds the gRPC channel
    connected and the first-use costs of Flask, the gRPC client and the model server's handlers
    paid (docs/benchmarks.md measures the first requests after a cold start).

    The HTTP metrics leave these requests out; the model call and generation metrics count the
    work the model server did for them. An answer other than 200 (a model not available:
    /readyz says why) is logged. The warm-up is skipped when the model server does not accept
    the channel within WARM_UP_CONNECT_SECONDS, stops at the first model timeout (504: the rest
    would wait as long), and stops before any request when `go_on()` says so (the worker was
    told to stop)."""
    gateway = app.extensions[EXTENSION]
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
    answered, waiting = 0, set()
    for path, body in sent:
        if not go_on():
            return
        # Closed when done: a generation holds one of the process's slots until its response is.
        with client.post(path, environ_overrides={WARM_UP_ENVIRON: True}, **body) as response:
            text = response.get_data(as_text=True)  # a stream runs as it is read
        if response.status_code == 200:
            answered += 1
        elif response.status_code == 503 and "model_unavailable" in text:
            waiting.add(path)  # no version yet (make run serves while it trains): nothing to warm
        else:
            log.info("warm-up: %s answered %d: %s", path, response.status_code, text[:200].strip())
            if response.status_code == 504:
                break
    skipped = f", {len(waiting)} left for models with no version yet" if waiting else ""
    log.info("warm-up: %d of %d requests answered in %.0f ms%s", answered, len(sent),
             (time.perf_counter() - started) * 1000, skipped)
