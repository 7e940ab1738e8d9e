"""The gateway's own pages: the drawing page, the API description, the probes and the model list."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import grpc
from flask import Blueprint, current_app, jsonify

from serving.gateway.errors import RETRY_AFTER_SECONDS
from serving.gateway.state import gateway

OPENAPI = Path(__file__).with_name("openapi.json")  # the HTTP API as data, served at /openapi.json

status = Blueprint("status", __name__)


@status.get("/")
def drawing_page():
    return current_app.send_static_file("index.html")


@status.get("/openapi.json")
def openapi_description():
    return current_app.response_class(openapi_bytes(), mimetype="application/json")


@cache
def openapi_bytes() -> bytes:
    return OPENAPI.read_bytes()


@status.get("/healthz")
def healthz():
    return jsonify(status="ok")


@status.get("/v1/models")
def models():
    return jsonify(models=[model_report(name) for name in gateway().model_names])


@status.get("/readyz")
def readyz():
    reports = [model_report(name) for name in gateway().model_names]
    ready = all(report["available"] for report in reports)
    response = jsonify(ready=ready, models=reports)
    if not ready:
        response.status_code = 503
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


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
