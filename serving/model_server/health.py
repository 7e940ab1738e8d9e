"""gRPC's standard health service (grpc.health.v1.Health, --enable_grpc_healthcheck_service):
SERVING once every model of the config has a version loaded, NOT_SERVING before. Its two
messages are built here (grpcio ships no health service without an extra package)."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving.model_server.servables import ServableManager

SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


def _messages():
    types = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1",
                                              syntax="proto3")
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=types.TYPE_STRING, label=types.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    response.field.add(name="status", number=1, type=types.TYPE_INT32, label=types.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{name}"))
            for name in ("HealthCheckRequest", "HealthCheckResponse")]


HealthCheckRequest, HealthCheckResponse = _messages()  # the status enum travels as its number


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
