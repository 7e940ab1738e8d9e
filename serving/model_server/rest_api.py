"""TF Serving's REST API (status, metadata, predict, classify, regress) over a ServableManager.

Request and response formats follow TF Serving's documentation: "instances" (row format)
or "inputs" (columnar format) in, "predictions" or "outputs" out, {"b64": ...} for bytes;
"examples" (and an optional "context") of tf.Example features in for classify and regress,
"results" out.
"""

from __future__ import annotations

import base64
import threading

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from google.protobuf import json_format
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, input_pb2
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler, make_server

from serving.model_server import inference
from serving.model_server.options import ServerOptions
from serving.model_server.servables import ServableManager, ServingError
from serving.tfserving.versions import STATE_NAMES

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


MANAGER = "servable_manager"  # the app.extensions key of the ServableManager it serves
OPTIONS = "server_options"
api = Blueprint("tf_serving_rest", __name__)


def create_rest_app(manager: ServableManager, options: ServerOptions | None = None) -> Flask:
    options = options or ServerOptions()
    app = Flask("scribe_model_server_rest")
    app.extensions[MANAGER] = manager
    app.extensions[OPTIONS] = options
    if options.prometheus_path:
        app.add_url_rule(options.prometheus_path, "prometheus", prometheus)
    if options.rest_cors:
        app.after_request(allow_any_origin)
    app.register_error_handler(ServingError, serving_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, internal_error)
    app.register_blueprint(api)
    return app


def manager() -> ServableManager:
    return current_app.extensions[MANAGER]


def allow_any_origin(response):
    """--rest_api_enable_cors_support, as TF Serving answers: any origin."""
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type"
    return response


def prometheus():
    return Response(manager().metrics.render(), mimetype="text/plain")  # as TF Serving


def serving_error(error: ServingError):
    return jsonify(error=error.message), HTTP_STATUS.get(error.code, 500)


def http_error(error: HTTPException):
    return jsonify(error=error.description), error.code


def internal_error(error: Exception):
    current_app.logger.exception("REST request failed")
    return jsonify(error=f"internal error: {type(error).__name__}"), 500


@api.get("/v1/models/<name>")
@api.get("/v1/models/<name>/versions/<int:version>")
@api.get("/v1/models/<name>/labels/<label>")
def model_status(name, version=None, label=None):
    if label:
        version = manager().servable(name, label=label).version
    return jsonify(model_version_status=[
        {"version": str(v), "state": STATE_NAMES[state],
         "status": {"error_code": "UNKNOWN" if error else "OK", "error_message": error}}
        for v, state, error in manager().status(name, version)])


@api.get("/v1/models/<name>/metadata")
@api.get("/v1/models/<name>/versions/<int:version>/metadata")
@api.get("/v1/models/<name>/labels/<label>/metadata")
def metadata(name, version=None, label=None):
    servable = manager().servable(name, version, label)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signatures.signature_def[key].CopyFrom(signature_def)
    return jsonify(model_spec={"name": name, "signature_name": "", "version": str(servable.version)},
                   metadata={"signature_def": json_format.MessageToDict(
                       signatures, always_print_fields_with_no_presence=True,
                       preserving_proto_field_name=True)})  # TF Serving's own field names


@api.post("/v1/models/<name>:predict")
@api.post("/v1/models/<name>/versions/<int:version>:predict")
@api.post("/v1/models/<name>/labels/<label>:predict")
def predict(name, version=None, label=None):
    with manager().counted(name, "Predict", "REST"):  # every request counted, whatever fails
        return _predict(name, version, label)


@api.post("/v1/models/<name>:classify")
@api.post("/v1/models/<name>/versions/<int:version>:classify")
@api.post("/v1/models/<name>/labels/<label>:classify")
def classify(name, version=None, label=None):
    result = on_examples("Classify", inference.run_classification, name, version, label)
    return jsonify(results=[[[c.label, c.score] for c in row.classes] for row in result.classifications])


@api.post("/v1/models/<name>:regress")
@api.post("/v1/models/<name>/versions/<int:version>:regress")
@api.post("/v1/models/<name>/labels/<label>:regress")
def regress(name, version=None, label=None):
    result = on_examples("Regress", inference.run_regression, name, version, label)
    return jsonify(results=[r.value for r in result.regressions])


def on_examples(api: str, run, name: str, version: int | None, label: str | None):
    """Classify or Regress: `run` on the body's examples, counted in TF Serving's metrics."""
    with manager().counted(name, api, "REST"):
        body, servable = _json_object(), manager().servable(name, version, label)
        examples = inference.serialized_examples(examples_input(body))
        check_method = current_app.extensions[OPTIONS].method_name_check
        return run(servable, _signature_name(body), examples, check_method)


def _signature_name(body: dict) -> str:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
    return name


def examples_input(body: dict):
    """{"examples": [{feature: value}, ...], "context": {...}} -> tensorflow.serving.Input."""
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ServingError("INVALID_ARGUMENT", "'examples' must be a non-empty list of objects")
    request_input = input_pb2.Input()
    if "context" in body:
        listed = request_input.example_list_with_context
        listed.context.CopyFrom(json_example(body["context"]))
    else:
        listed = request_input.example_list
    for example in examples:
        listed.examples.add().CopyFrom(json_example(example))
    return request_input


def json_example(features) -> example_pb2.Example:
    """One tf.Example from JSON, as TF Serving reads it: numbers with a fraction (or any among
    integers) as floats, integers as int64s, strings and {"b64": ...} as bytes."""
    if not isinstance(features, dict):
        raise ServingError("INVALID_ARGUMENT", "an example must be a JSON object of features")
    example = example_pb2.Example()
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict) and set(v) != {"b64"} for v in values):
            raise ServingError("INVALID_ARGUMENT", f"feature '{key}': an object must be {{\"b64\": ...}}")
        feature = example.features.feature[key]
        if all(isinstance(v, (str, dict)) for v in values):
            feature.bytes_list.value.extend(_decode(v) if isinstance(v, dict) else v.encode()
                                            for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            raise ServingError("INVALID_ARGUMENT", f"feature '{key}': values must be all numbers "
                               "or all strings")
    return example


def _predict(name, version, label):
    body = _json_object()
    servable = manager().servable(name, version, label)
    signature = body.get("signature_name") or "serving_default"
    if not isinstance(signature, str) or signature not in servable.signature_defs:
        raise ServingError("INVALID_ARGUMENT", f"Serving signature name: \"{signature}\" not found")
    input_names = list(servable.signature_defs[signature].inputs)
    if ("instances" in body) == ("inputs" in body):
        raise ServingError("INVALID_ARGUMENT",
                           "Missing 'inputs' or 'instances' key (exactly one is required)")
    row_format = "instances" in body
    try:
        inputs = _rows_to_inputs(body["instances"], input_names) if row_format \
            else _columns_to_inputs(body["inputs"], input_names)
    except RecursionError:
        raise ServingError("INVALID_ARGUMENT", "the inputs are nested too deeply") from None
    outputs = servable.predict(signature, inputs)
    if row_format:
        return jsonify(predictions=_outputs_to_rows(outputs))
    columns = {key: _to_json(value) for key, value in outputs.items()}
    return jsonify(outputs=next(iter(columns.values())) if len(columns) == 1 else columns)


def _json_object() -> dict:
    """The request's body as a JSON object, whatever its Content-Type, as TF Serving reads it (its
    docs post with plain curl -d)."""
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        raise ServingError("INVALID_ARGUMENT", "JSON Parse error: the body must be a JSON object")
    return body


def _decode(value):
    """JSON value -> Python value, turning {"b64": "..."} into bytes, recursively."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        if not isinstance(value["b64"], str):
            raise ServingError("INVALID_ARGUMENT", "a {\"b64\": ...} value must be a string")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise ServingError("INVALID_ARGUMENT", "invalid base64 in a {\"b64\": ...} value") from None
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _array(value, name: str) -> np.ndarray:
    try:
        return np.array(_decode(value))
    except ValueError:
        raise ServingError("INVALID_ARGUMENT", f"input {name}: ragged or malformed tensor") from None


def _rows_to_inputs(instances, input_names: list[str]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
    if all(isinstance(row, dict) and "b64" not in row for row in instances):
        if any(set(row) != set(input_names) for row in instances):
            raise ServingError("INVALID_ARGUMENT",
                               f"every instance must name exactly the inputs {input_names}")
        columns = {name: [row[name] for row in instances] for name in input_names}
        return {name: _array(values, name) for name, values in columns.items()}
    if len(input_names) != 1:
        raise ServingError("INVALID_ARGUMENT", f"instances must be objects naming {input_names}")
    return {input_names[0]: _array(instances, input_names[0])}


def _columns_to_inputs(inputs, input_names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict) and not set(inputs) == {"b64"}:
        return {name: _array(value, name) for name, value in inputs.items()}
    if len(input_names) != 1:
        raise ServingError("INVALID_ARGUMENT", f"inputs must be an object naming {input_names}")
    return {input_names[0]: _array(inputs, input_names[0])}


def _to_json(value: np.ndarray):
    if value.dtype.kind in "SO":
        def text(item):
            try:
                return item.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(item).decode("ascii")}
        return np.vectorize(text, otypes=[object])(value).tolist() if value.ndim else text(value.item())
    return value.tolist()


def _outputs_to_rows(outputs: dict[str, np.ndarray]):
    columns = {key: _to_json(value) for key, value in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    batch = len(next(iter(columns.values())))
    return [{key: column[i] for key, column in columns.items()} for i in range(batch)]


class TimedRequestHandler(WSGIRequestHandler):
    """A connection that sends or reads nothing for `timeout` seconds is closed."""

    timeout = 30.0


def start_rest_server(manager: ServableManager, options: ServerOptions):
    """Serve the REST API in a background thread: at most rest_threads requests at once, each
    connection closed after rest_timeout_seconds without progress. Returns the server and its
    port."""
    handler = type("RestRequestHandler", (TimedRequestHandler,), {"timeout": options.rest_timeout_seconds})
    app = at_most(options.rest_threads, create_rest_app(manager, options))
    server = make_server(options.host, options.rest_port, app, threaded=True, request_handler=handler)
    threading.Thread(target=server.serve_forever, name="rest-api", daemon=True).start()
    return server, server.server_port


def at_most(count: int, app):
    """The WSGI app, run for at most `count` requests at once (--rest_api_num_threads)."""
    slots = threading.BoundedSemaphore(max(1, count))

    def limited(environ, start_response):
        with slots:
            return app(environ, start_response)
    return limited
