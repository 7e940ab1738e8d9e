"""The gateway's calls to a TF Serving model server: a few honest lines of gRPC each, with TF
Serving's messages from serving/tfserving/protos.py (no TensorFlow in the gateway)."""

from __future__ import annotations

import json

import grpc
import numpy as np

from serving.gateway.config import channel_target
from serving.tfserving import protos as api
from serving.tfserving.tensors import MAX_MESSAGE_BYTES, from_proto, to_proto
from serving.tfserving.versions import STATE_NAMES

# When the model server goes away, gRPC retries the connection with exponential backoff (1 s,
# then x1.6 per failure, up to 120 s). Meanwhile every call fails at once with UNAVAILABLE (a
# 503), even after the model server is back, for longer the longer the outage was. Backing off
# from 0.1 s up to at most 1 s finds a restarted model server within about a second; one
# connection attempt a second to one address costs nothing. tests/test_faults.py checks it
# (docs/reliability.md).
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000}


# Several model servers behind one channel: gRPC's own round_robin policy spreads the calls over
# every address the target names, and its retry policy sends a call that failed with UNAVAILABLE
# before any server answered it (a server killed or restarting, a full batching queue) to another
# server within the same deadline. Safe: Predict and GetModelStatus change nothing on the server.
RETRY_ON_ANOTHER_SERVER = {
    "name": [{"service": "tensorflow.serving.PredictionService"},
             {"service": "tensorflow.serving.ModelService"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}


def service_config(retries: bool) -> str:
    """The channel's gRPC service config: round_robin, and the retry policy unless told not to
    (model_servers.py asks each server on its own and wants its own answer)."""
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "methodConfig": [RETRY_ON_ANOTHER_SERVER] if retries else []})


class ModelClient:
    """One long-lived channel to the model servers; every call has a deadline."""

    def __init__(self, target: str, timeout: float, retries: bool = True):
        self.target, self.timeout = target, timeout
        self.channel = grpc.insecure_channel(channel_target(target), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.service_config", service_config(retries)),
            ("grpc.enable_retries", int(retries)),
            *RECONNECT_BACKOFF_MS.items(),
        ])
        # The two methods the gateway calls, as TF Serving's generated stubs define them.
        self._predict = self.channel.unary_unary(
            api.PREDICT, request_serializer=api.PredictRequest.SerializeToString,
            response_deserializer=api.PredictResponse.FromString)
        self._get_model_status = self.channel.unary_unary(
            api.GET_MODEL_STATUS, request_serializer=api.GetModelStatusRequest.SerializeToString,
            response_deserializer=api.GetModelStatusResponse.FromString)

    def predict(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None,
                label: str | None = None, signature: str = "serving_default",
                timeout: float | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Call Predict; returns the outputs and the version that answered."""
        request = api.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        elif label:
            request.model_spec.version_label = label
        for key, value in inputs.items():
            to_proto(value, into=request.inputs[key])
        response = self._predict(request, timeout=timeout or self.timeout)
        outputs = {key: from_proto(proto) for key, proto in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def status(self, model: str) -> list[dict]:
        """Versions of `model` the server knows: [{"version", "state", "error"}], newest first."""
        request = api.GetModelStatusRequest()
        request.model_spec.name = model
        response = self._get_model_status(request, timeout=self.timeout)
        return [{"version": s.version, "state": STATE_NAMES.get(s.state, str(s.state)),
                 "error": s.status.error_message}
                for s in response.model_version_status]

    def close(self) -> None:
        self.channel.close()
