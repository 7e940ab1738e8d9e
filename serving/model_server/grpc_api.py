"""TF Serving's gRPC API (PredictionService, ModelService) over a ServableManager."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving.model_server import inference
from serving.model_server.inference import model_spec_of
from serving.model_server.options import ServerOptions
from serving.model_server.servables import ServableManager, ServingError
from serving.tfserving.tensors import MAX_MESSAGE_BYTES, from_proto, to_proto

log = logging.getLogger("scribe.model_server")


def _abort(context, error: ServingError):
    context.abort(getattr(grpc.StatusCode, error.code), error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ServableManager, check_method: bool = False):
        self.manager, self.check_method = manager, check_method

    def answer(self, api: str, model: str, context, work: Callable[[], object]):
        """`work()`, counted in TF Serving's metrics, its ServingError as the gRPC status."""
        try:
            with self.manager.counted(model, api, "GRPC"):  # whatever fails
                return work()
        except ServingError as error:
            _abort(context, error)
        except Exception as error:  # never an opaque UNKNOWN: say INTERNAL and log it
            log.exception("%s failed", api)
            _abort(context, ServingError("INTERNAL", f"{type(error).__name__}: {error}"))

    def Predict(self, request, context):
        return self.answer("Predict", request.model_spec.name, context, lambda: self._predict(request))

    def _predict(self, request) -> predict_pb2.PredictResponse:
        try:
            servable = self.manager.servable(*model_spec_of(request.model_spec))
            inputs = {key: from_proto(proto) for key, proto in request.inputs.items()}
            outputs = servable.predict(request.model_spec.signature_name, inputs,
                                       list(request.output_filter) or None)
        except (ValueError, TypeError, KeyError) as error:  # a TensorProto that does not decode: a
            # bad length (ValueError), a dtype that is not a tensor's (TypeError, KeyError)
            raise ServingError("INVALID_ARGUMENT", str(error)) from None
        response = predict_pb2.PredictResponse()
        inference.fill_model_spec(response.model_spec, servable, request.model_spec.signature_name)
        for key, value in outputs.items():
            to_proto(value, into=response.outputs[key])
        return response

    def Classify(self, request, context):
        return self.on_examples("Classify", request, context, classification_pb2.ClassificationResponse,
                                inference.run_classification)

    def Regress(self, request, context):
        return self.on_examples("Regress", request, context, regression_pb2.RegressionResponse,
                                inference.run_regression)

    def on_examples(self, api: str, request, context, response_class, run):
        """Classify or Regress: `run` on the request's examples, in TF Serving's response."""
        def work():
            servable = self.manager.servable(*model_spec_of(request.model_spec))
            response = response_class()
            examples = inference.serialized_examples(request.input)
            response.result.CopyFrom(run(servable, request.model_spec.signature_name, examples,
                                         self.check_method))
            inference.fill_model_spec(response.model_spec, servable, request.model_spec.signature_name)
            return response
        return self.answer(api, request.model_spec.name, context, work)

    def MultiInference(self, request, context):
        model = request.tasks[0].model_spec.name if request.tasks else ""
        return self.answer("MultiInference", model, context,
                           lambda: inference.multi_inference(self.manager, request, self.check_method))

    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            _abort(context, ServingError("INVALID_ARGUMENT",
                                         "Metadata field signature_def is the only one supported"))
        try:
            servable = self.manager.servable(*model_spec_of(request.model_spec))
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
        name, version, label = model_spec_of(request.model_spec)
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


def start_grpc_server(manager: ServableManager, options: ServerOptions) -> tuple[grpc.Server, int]:
    """Serve both services on options.host:grpc_port (0 picks a free port), and on the Unix
    socket grpc_socket_path if given. Returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *options.grpc_channel_arguments,
    ])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, options.method_name_check), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    if options.health_service:
        from serving.model_server.health import add_health_service

        add_health_service(server, manager)
    address = f"{options.host}:{options.grpc_port}"
    bound = bind(server, address, options.grpc_credentials)
    if options.grpc_socket_path:
        bind(server, f"unix:{options.grpc_socket_path}")
    server.start()
    return server, bound


def bind(server: grpc.Server, address: str, credentials=None) -> int:
    """Listen on `address` (TLS or ALTS with `credentials`); its port, or OSError."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address))
    except RuntimeError:  # grpcio's "Failed to bind"
        port = 0
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return port
