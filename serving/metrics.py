"""Prometheus metrics for the gateway: requests, latencies and errors per endpoint and status."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.config import WARM_UP_ENVIRON

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Label values come from this fixed set: a client must not be able to mint new time series
# (each costs memory for good) by sending requests with made-up method names.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def install_metrics(app: Flask) -> CollectorRegistry:
    registry = CollectorRegistry()  # one per app, so several apps can live in one process
    requests = Counter("scribe_http_requests_total", "HTTP requests by endpoint and status",
                       ["endpoint", "method", "status"], registry=registry)
    errors = Counter("scribe_http_errors_total", "HTTP responses with status >= 400",
                     ["endpoint", "status"], registry=registry)
    latency = Histogram("scribe_http_request_seconds", "HTTP request latency by endpoint",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
    app.extensions["model_call_seconds"] = Histogram(
        "scribe_model_call_seconds", "gRPC calls to the model server", ["model", "outcome"],
        buckets=LATENCY_BUCKETS, registry=registry)
    app.extensions["requests_per_model_call"] = Histogram(
        "scribe_requests_per_model_call", "digit requests carried by each Predict call (coalescing)",
        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=registry)

    app.extensions["generation_chunks"] = Counter(
        "scribe_generation_chunks_total", "text chunks generated for streams", registry=registry)
    app.extensions["generations_in_flight"] = Gauge(
        "scribe_generations_in_flight", "text generations holding a slot (streams until they end)",
        registry=registry)
    app.extensions["generation_rejections"] = Counter(
        "scribe_generation_rejections_total", "text generations turned away with 429: all slots taken",
        registry=registry)

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def record(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        if endpoint != "/metrics" and not request.environ.get(WARM_UP_ENVIRON):
            method = request.method if request.method in METHODS else "other"
            requests.labels(endpoint, method, str(response.status_code)).inc()
            if response.status_code >= 400:
                errors.labels(endpoint, str(response.status_code)).inc()
            if "started" in g:
                latency.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.get("/metrics")
    def metrics():
        # content_type, not mimetype: CONTENT_TYPE_LATEST has its charset already
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    return registry
