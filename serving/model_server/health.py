"""gRPC's standard health service (grpc.health.v1.Health, --enable_grpc_healthcheck_service):
SERVING once every model of the config has a version loaded, NOT_SERVING before. Its two
messages are built here (grpcio ships no health service without an extra package)."""

from __future__ import annotations

import grpc

from serving.model_server.servables import ServableManager
from serving.tfserving.configs import message_classes

SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


_MESSAGES = message_classes("grpc/health/v1/health.proto", "grpc.health.v1", {
    "HealthCheckRequest": [("service", 1, "string")],
    "HealthCheckResponse": [("status", 1, "int32")],  # the status enum travels as its number
})
HealthCheckRequest, HealthCheckResponse = _MESSAGES["HealthCheckRequest"], _MESSAGES["HealthCheckResponse"]


def add_health_service(server: grpc.Server, manager: ServableManager) -> None:
    def check(request, context):
        if request.service not in ("", "tensorflow.serving.PredictionService",
                                   "tensorflow.serving.ModelService"):
            return HealthCheckResponse(status=SERVICE_UNKNOWN)
        ready = all(manager.is_available(name) for name in list(manager.models))
        return HealthCheckResponse(status=SERVING if ready else NOT_SERVING)

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString)})])
