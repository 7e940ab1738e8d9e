"""Prometheus metrics for the gateway: requests, latencies and errors per endpoint and status."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.gateway.config import WARM_UP_ENVIRON

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Label values come from this fixed set: a client must not be able to mint new time series
# (each costs memory for good) by sending requests with made-up method names.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class ModelMetrics:
    """What the APIs record of their work, beside the HTTP metrics that every request gets."""

    model_call_seconds: Histogram
    requests_per_model_call: Histogram
    generation_chunks: Counter
    generations_in_flight: Gauge
    generation_rejections: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ModelMetrics:
        return cls(
            Histogram("scribe_model_call_seconds", "gRPC calls to the model server", ["model", "outcome"],
                      buckets=LATENCY_BUCKETS, registry=registry),
            Histogram("scribe_requests_per_model_call",
                      "digit requests carried by each Predict call (coalescing)",
                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=registry),
            Counter("scribe_generation_chunks_total", "text chunks generated for streams",
                    registry=registry),
            Gauge("scribe_generations_in_flight",
                  "text generations holding a slot (streams until they end)", registry=registry),
            Counter("scribe_generation_rejections_total",
                    "text generations turned away with 429: all slots taken", registry=registry))


def install_http_metrics(app: Flask, registry: CollectorRegistry) -> None:
    """Requests, errors and latency per endpoint, and GET /metrics for everything in `registry`."""
    requests = Counter("scribe_http_requests_total", "HTTP requests by endpoint and status",
                       ["endpoint", "method", "status"], registry=registry)
    errors = Counter("scribe_http_errors_total", "HTTP responses with status >= 400",
                     ["endpoint", "status"], registry=registry)
    latency = Histogram("scribe_http_request_seconds", "HTTP request latency by endpoint",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)

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

