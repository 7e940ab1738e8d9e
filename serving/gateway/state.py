"""What a request needs, in one typed place: the gateway's connection to its model server, the
batcher that coalesces digit calls, the generation slots and the metrics. create_app builds one
`Gateway` per app; a view reaches it with `gateway()`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import grpc
import numpy as np
from flask import current_app

from serving.gateway import errors
from serving.gateway.config import EXTENSION, Settings
from serving.gateway.metrics import ModelMetrics
from serving.gateway.model_client import ModelClient
from serving.gateway.model_servers import ModelServers
from serving.tfserving.batching import DynamicBatcher

Result = TypeVar("Result")
BN = "bn"  # the top rung of the digits ladder: the batch-norm CNN, SCRIBE_DIGITS_MODEL


@dataclass
class Gateway:
    settings: Settings
    client: ModelClient
    model_names: list[str]  # every model of the model config, in its order
    metrics: ModelMetrics
    generation_slots: threading.BoundedSemaphore  # SCRIBE_MAX_GENERATIONS at once
    digit_calls: DynamicBatcher | None  # coalesces digit requests into shared Predict calls
    servers: ModelServers  # each model server on its own, for /readyz and /v1/models

    @cached_property
    def required_models(self) -> list[str]:
        """The models the endpoints call unless told otherwise: /readyz waits for these (every
        configured model if the config names neither). The ladder's lower rungs are optional (not
        available until `make ladder` trains them)."""
        defaults = (self.settings.digits_model, self.settings.text_model)
        return [n for n in defaults if n in self.model_names] or list(self.model_names)

    @cached_property
    def digits_ladder(self) -> dict[str, str]:
        """Rung -> served model, top rung first: "bn" is SCRIBE_DIGITS_MODEL, and every
        <digits model>-<rung> of the model config is a lower rung (listed bottom-up there)."""
        prefix = f"{self.settings.digits_model}-"
        lower = [n for n in self.model_names if n.startswith(prefix)]
        return {BN: self.settings.digits_model, **{n.removeprefix(prefix): n for n in reversed(lower)}}

    @classmethod
    def connect(cls, settings: Settings, model_names: list[str], metrics: ModelMetrics) -> Gateway:
        client = ModelClient(settings.model_server, settings.model_timeout_seconds)
        slots = threading.BoundedSemaphore(settings.max_generations)
        servers = ModelServers(settings.model_server, settings.model_timeout_seconds)
        gateway = cls(settings, client, model_names, metrics, slots, None, servers)
        if settings.coalesce_calls > 0:
            gateway.digit_calls = gateway.digit_call_batcher()
        return gateway

    def digit_call_batcher(self) -> DynamicBatcher:
        """Requests that arrive while this process's digit calls are all in flight share the next
        call: a gRPC call costs the gateway and the model server more CPU than the CNN spends on an
        image. One that finds a call free goes at once (no timeout): coalescing never waits for
        company, it only shares under load. Keyed by model and pin."""
        def call_digits(inputs, pin):
            model, version, label = pin
            outputs, served = self.client.predict(model, inputs, version=version, label=label)
            return {**outputs, "version": np.full(len(inputs["image"]), served)}

        return DynamicBatcher(call_digits, {
            "max_batch_size": self.settings.max_images, "batch_timeout_micros": 0,
            "num_batch_threads": self.settings.coalesce_calls,
            "max_enqueued_batches": self.settings.threads + 1,  # never full: each thread waits once
        }, "digit-calls", on_batch=self.metrics.requests_per_model_call.observe)

    def model_call(self, model: str, pinned: bool, call: Callable[[], Result]) -> Result:
        """Run one call to the model server: timed in scribe_model_call_seconds by outcome, and
        its gRPC error turned into the API's error for `model`."""
        timer = self.metrics.model_call_seconds
        started = time.perf_counter()
        try:
            result = call()
        except grpc.RpcError as error:
            timer.labels(model, error.code().name).observe(time.perf_counter() - started)
            raise errors.from_grpc(error, model, pinned=pinned) from None
        timer.labels(model, "OK").observe(time.perf_counter() - started)
        return result

    def predict(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None,
                label: str | None = None, signature: str = "serving_default"
                ) -> tuple[dict[str, np.ndarray], int]:
        """Predict on `model`: its outputs and the version that answered."""
        return self.model_call(model, bool(version or label), lambda: self.client.predict(
            model, inputs, version=version, label=label, signature=signature))

    def predict_digits(self, images: np.ndarray, version: int | None, label: str | None,
                       model: str | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Predict on a digits model (default SCRIBE_DIGITS_MODEL), in a call shared with
        concurrent requests of the same model and pin when coalescing is on."""
        model = model or self.settings.digits_model
        if self.digit_calls is None:
            return self.predict(model, {"image": images}, version, label)

        def shared_call():
            outputs = self.digit_calls.submit({"image": images}, key=(model, version, label))
            return outputs, int(outputs.pop("version")[0])
        return self.model_call(model, bool(version or label), shared_call)

    def close(self) -> None:
        if self.digit_calls is not None:
            self.digit_calls.stop()
        self.servers.close()
        self.client.close()


def gateway() -> Gateway:
    """The Gateway of the app handling the current request."""
    return current_app.extensions[EXTENSION]
