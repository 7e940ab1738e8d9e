"""The gateway's own pages: the drawing page, the API description, the probes and the model list."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flask import Blueprint, current_app, jsonify

from serving.gateway.errors import RETRY_AFTER_SECONDS
from serving.gateway.model_servers import NO_VERSION, ServerReport
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
    model_reports, server_reports = fleet_report()
    return jsonify(models=model_reports, servers=server_reports)


@status.get("/readyz")
def readyz():
    """Ready while at least one model server has every required model AVAILABLE (the digits and
    text models; the ladder's lower rungs are optional): the gateway's calls go to the servers
    that answer (model_client.py)."""
    model_reports, server_reports = fleet_report(gateway().required_models)
    ready = any(server["ready"] for server in server_reports)
    response = jsonify(ready=ready, models=model_reports, servers=server_reports)
    if not ready:
        response.status_code = 503
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def fleet_report(names: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """`names` (default: every configured model) over all model servers, and every server's own
    answer, asked at once."""
    names = names or gateway().model_names
    servers = gateway().servers.reports(names)
    required = gateway().required_models
    return ([model_report(name, servers) for name in names],
            [server_report(s, names, required) for s in servers])


def model_report(name: str, servers: list[ServerReport]) -> dict:
    """One model over the servers: available on some; its versions as the server with the newest
    AVAILABLE version has them (servers differ for a poll interval after a push); `servers`: the
    addresses that serve it."""
    serving = [s for s in servers if s.available(name)]
    if not serving:
        answers = [s for s in servers if s.models.get(name)]
        errors = [s.errors[name] for s in servers if name in s.errors]
        # A server that has it, loading, or says it has none, outranks one that did not answer.
        reason = (NO_VERSION if answers or NO_VERSION in errors
                  else next(iter(errors), "no model server found"))
        return {"name": name, "available": False, "versions": answers[0].models[name] if answers else [],
                "reason": reason, "servers": []}
    newest = max(serving, key=lambda s: max(s.available(name)))
    return {"name": name, "available": True, "serving_version": max(newest.available(name)),
            "versions": newest.models[name], "servers": [s.address for s in serving]}


def server_report(server: ServerReport, names: list[str], required: list[str]) -> dict:
    """One model server: whether it answered, whether it serves every required model, and which
    version of each model it serves (null: none)."""
    report = {"address": server.address, "answered": server.answered, "ready": server.serves_all(required),
              "serving": {name: max(server.available(name), default=None) for name in names}}
    if not server.answered:
        report["reason"] = next(iter(server.errors.values()), "no answer")
    return report
