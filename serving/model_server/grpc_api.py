"""TF Serving's gRPC API (PredictionService, ModelService) over a ServableManager."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_server.servables import ServableManager, ServingError
from serving.tfserving.tensors import MAX_MESSAGE_BYTES, from_proto, to_proto

log = logging.getLogger("scribe.model_server")


def _spec(request_spec):
    version = request_spec.version.value if request_spec.HasField("version") else None
    return request_spec.name, version, request_spec.version_label or None


def _abort(context, error: ServingError):
    context.abort(getattr(grpc.StatusCode, error.code), error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ServableManager):
        self.manager = manager

    def Predict(self, request, context):
        try:
            with self.manager.counted_predict(request.model_spec.name, "GRPC"):  # whatever fails
                return self._predict(request)
        except ServingError as error:
            _abort(context, error)
        except Exception as error:  # never an opaque UNKNOWN: say INTERNAL and log it
            log.exception("Predict failed")
            _abort(context, ServingError("INTERNAL", f"{type(error).__name__}: {error}"))

    def _predict(self, request) -> predict_pb2.PredictResponse:
        try:
            servable = self.manager.servable(*_spec(request.model_spec))
            inputs = {key: from_proto(proto) for key, proto in request.inputs.items()}
            outputs = servable.predict(request.model_spec.signature_name, inputs,
                                       list(request.output_filter) or None)
        except (ValueError, TypeError, KeyError) as error:  # a TensorProto that does not decode: a
            # bad length (ValueError), a dtype that is not a tensor's (TypeError, KeyError)
            raise ServingError("INVALID_ARGUMENT", str(error)) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for key, value in outputs.items():
            to_proto(value, into=response.outputs[key])
        return response

    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            _abort(context, ServingError("INVALID_ARGUMENT",
                                         "Metadata field signature_def is the only one supported"))
        try:
            servable = self.manager.servable(*_spec(request.model_spec))
        except ServingError as error:
            _abort(context, error)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in servable.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ServableManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        name, version, label = _spec(request.model_spec)
        try:
            if label:
                version = self.manager.servable(name, label=label).version
            statuses = self.manager.status(name, version)
        except ServingError as error:
            _abort(context, error)
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, state, error in statuses:
            status = response.model_version_status.add(version=number, state=state)
            if error:
                status.status.error_code = 2  # UNKNOWN, as TF Serving reports load failures
                status.status.error_message = error
        return response


def start_grpc_server(manager: ServableManager, port: int, host: str = "0.0.0.0",
                      workers: int = 32, unix_socket: str | None = None) -> tuple[grpc.Server, int]:
    """Serve both services on host:port (0 picks a free port), and on a Unix socket if given.
    Returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    if unix_socket and server.add_insecure_port(f"unix:{unix_socket}") == 0:
        raise OSError(f"cannot bind the gRPC socket {unix_socket}")
    server.start()
    return server, bound
