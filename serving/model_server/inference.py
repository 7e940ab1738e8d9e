"""TF Serving's estimator-style APIs: Classify, Regress and MultiInference. Serialized
tf.Examples go in (each prefixed by the request's context, if any, as TF Serving joins them), a
classification or regression signature runs, and TF Serving's results come out, with its errors
for a signature that is not of the kind asked for. gRPC (grpc_api.py) and REST (rest_api.py)
both call these."""

from __future__ import annotations

import numpy as np
from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

from serving.model_server.servables import Servable, ServableManager, ServingError

CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


def model_spec_of(request_spec) -> tuple[str, int | None, str | None]:
    """A request's ModelSpec as (name, version or None, label or None)."""
    version = request_spec.version.value if request_spec.HasField("version") else None
    return request_spec.name, version, request_spec.version_label or None


def serialized_examples(request_input) -> np.ndarray:
    """A tensorflow.serving.Input as the [batch] string tensor a signature's `inputs` takes."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        rows = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        context = listed.context.SerializeToString()
        rows = [context + e.SerializeToString() for e in listed.examples]
    else:
        raise ServingError("INVALID_ARGUMENT", "Input is empty")
    if not rows:
        raise ServingError("INVALID_ARGUMENT", "Input is empty")
    return np.array(rows, dtype=object)


def signature_of(servable: Servable, name: str, method: str, check_method: bool):
    """The signature `name` (default serving_default), checked to take serialized examples."""
    name = name or "serving_default"
    signature = servable.signature_defs.get(name)
    if signature is None:
        raise ServingError("INVALID_ARGUMENT", f"No signature was found with the name: {name}")
    if check_method and signature.method_name != method:
        raise ServingError("INVALID_ARGUMENT", f"Expected {method.split('/')[-1]} signature "
                           f"method_name to be {method}. Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise ServingError("INVALID_ARGUMENT", "Expected one input Tensor.")
    if "inputs" not in signature.inputs:
        raise ServingError("INVALID_ARGUMENT", f"No {method.split('/')[-1]} inputs found in "
                           f"SignatureDef: {name}")
    return name, signature


def run_classification(servable: Servable, signature_name: str, examples: np.ndarray,
                       check_method: bool) -> classification_pb2.ClassificationResult:
    """`examples`: serialized_examples of the request's input."""
    name, signature = signature_of(servable, signature_name, CLASSIFY, check_method)
    wanted = [key for key in ("classes", "scores") if key in signature.outputs]
    if not wanted or not 1 <= len(signature.outputs) <= 2:
        raise ServingError("INVALID_ARGUMENT", "Expected classification signature outputs to "
                           "contain classes and/or scores")
    outputs = servable.predict(name, {"inputs": examples}, wanted)
    classes, scores = (_per_row(outputs.get(key), len(examples), key) for key in ("classes", "scores"))
    result = classification_pb2.ClassificationResult()
    for row in range(len(examples)):
        count = (classes if classes is not None else scores).shape[1]
        classification = result.classifications.add()
        for i in range(count):
            label = classes[row, i] if classes is not None else b""
            entry = classification.classes.add(label=label.decode() if isinstance(label, bytes) else label)
            if scores is not None:
                entry.score = float(scores[row, i])
    return result


def run_regression(servable: Servable, signature_name: str, examples: np.ndarray,
                   check_method: bool) -> regression_pb2.RegressionResult:
    """`examples`: serialized_examples of the request's input."""
    name, signature = signature_of(servable, signature_name, REGRESS, check_method)
    if list(signature.outputs) != ["outputs"]:
        raise ServingError("INVALID_ARGUMENT", "Expected one output Tensor named outputs.")
    values = _per_row(servable.predict(name, {"inputs": examples})["outputs"], len(examples), "outputs")
    if values.shape[1] != 1:
        raise ServingError("INVALID_ARGUMENT", f"Expected output Tensor shape to be either "
                           f"[batch_size] or [batch_size, 1] but got {list(values.shape)}")
    result = regression_pb2.RegressionResult()
    for value in values[:, 0]:
        result.regressions.add(value=float(value))
    return result


def _per_row(value, rows: int, key: str):
    """An output as [batch, n] (a [batch] output is [batch, 1]), or None when it is missing."""
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim == 1:
        value = value[:, None]
    if value.ndim != 2 or value.shape[0] != rows:
        raise ServingError("INVALID_ARGUMENT", f"Expected {key} Tensor shape: [batch_size "
                           f"num_classes] but got {list(value.shape)}")
    return value


def fill_model_spec(spec, servable: Servable, signature_name: str) -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = signature_name or "serving_default"


def multi_inference(manager: ServableManager, request,
                    check_method: bool) -> inference_pb2.MultiInferenceResponse:
    """Every task on the same model version and the same examples, as TF Serving requires."""
    if not request.tasks:
        raise ServingError("INVALID_ARGUMENT", "Found no tasks in the request")
    names = {task.model_spec.name for task in request.tasks}
    if len(names) > 1:
        raise ServingError("INVALID_ARGUMENT",
                           "All ModelSpecs in a MultiInferenceRequest must access the same model name.")
    signatures = [task.model_spec.signature_name or "serving_default" for task in request.tasks]
    if len(set(signatures)) < len(signatures):
        raise ServingError("INVALID_ARGUMENT", "Duplicate evaluation of signature in the request")
    servable = manager.servable(*model_spec_of(request.tasks[0].model_spec))
    examples = serialized_examples(request.input)  # once, for every task
    response = inference_pb2.MultiInferenceResponse()
    for task in request.tasks:
        result = response.results.add()
        signature = task.model_spec.signature_name
        if task.method_name == CLASSIFY:
            result.classification_result.CopyFrom(
                run_classification(servable, signature, examples, check_method))
        elif task.method_name == REGRESS:
            result.regression_result.CopyFrom(
                run_regression(servable, signature, examples, check_method))
        else:
            raise ServingError("UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}")
        fill_model_spec(result.model_spec, servable, signature)
    return response
