"""TF Serving's REST API (status, metadata, predict) over a ServableManager.

Request and response formats follow TF Serving's documentation: "instances" (row format)
or "inputs" (columnar format) in, "predictions" or "outputs" out, {"b64": ...} for bytes.
"""

from __future__ import annotations

import base64
import threading

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from serving.model_server.servables import ServableManager, ServingError
from serving.tfserving.versions import STATE_NAMES

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


MANAGER = "servable_manager"  # the app.extensions key of the ServableManager it serves
api = Blueprint("tf_serving_rest", __name__)


def create_rest_app(manager: ServableManager, prometheus_path: str | None = None) -> Flask:
    app = Flask("scribe_model_server_rest")
    app.extensions[MANAGER] = manager
    if prometheus_path:
        app.add_url_rule(prometheus_path, "prometheus", prometheus)
    app.register_error_handler(ServingError, serving_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, internal_error)
    app.register_blueprint(api)
    return app


def manager() -> ServableManager:
    return current_app.extensions[MANAGER]


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
    with manager().counted_predict(name, "REST"):  # every request counted, whatever fails
        return _predict(name, version, label)


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


def start_rest_server(manager: ServableManager, port: int, host: str = "0.0.0.0",
                      prometheus_path: str | None = None):
    """Serve the REST API in a background thread. Returns the server and its port."""
    server = make_server(host, port, create_rest_app(manager, prometheus_path), threaded=True)
    threading.Thread(target=server.serve_forever, name="rest-api", daemon=True).start()
    return server, server.server_port
