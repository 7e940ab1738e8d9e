"""The embedded model server speaks TF Serving's gRPC and REST APIs, started with its flags."""

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import ROOT, free_port
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from training.mnist_data import load_digits


@pytest.fixture(scope="module")
def model_server(trained):
    grpc_port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.model_server", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", "--model_config_file=serving/models.config",
         "--file_system_poll_wait_seconds=1", "--enable_model_warmup=true",
         f"--base_path_map=/models={trained.model_base}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rest = f"http://127.0.0.1:{rest_port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(rest + "/v1/models/digits", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield rest, channel
    channel.close()
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def test_digits():
    splits = load_digits("mnist-5k")
    return splits.x_test[:32], splits.y_test[:32]


def grpc_predict(channel, images, name="digits", key="image", timeout=10):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs[key].CopyFrom(tf.make_tensor_proto(images))
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)


def test_grpc_predict_returns_digits_and_the_version(model_server, test_digits):
    _, channel = model_server
    images, labels = test_digits
    response = grpc_predict(channel, images)
    assert response.model_spec.version.value == 1
    digits = tf.make_ndarray(response.outputs["digit"])
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (32, 10)
    assert (digits == labels).mean() > 0.85
    assert (digits == probabilities.argmax(axis=1)).all()


def test_grpc_errors_use_tf_serving_status_codes(model_server, test_digits):
    _, channel = model_server
    with pytest.raises(grpc.RpcError) as missing_model:
        grpc_predict(channel, test_digits[0], name="bard")
    assert missing_model.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as wrong_input:
        grpc_predict(channel, test_digits[0], key="pixels")
    assert wrong_input.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as wrong_shape:
        grpc_predict(channel, np.zeros((2, 5), np.float32))
    assert wrong_shape.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_model_status_and_metadata(model_server):
    _, channel = model_server
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "digits"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]

    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = "digits"
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    metadata = stub.GetModelMetadata(metadata_request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    serving_default = signatures.signature_def["serving_default"]
    assert set(serving_default.inputs) == {"image"}
    assert set(serving_default.outputs) == {"probabilities", "digit"}


def test_rest_status_and_metadata(model_server):
    rest, _ = model_server
    assert requests.get(rest + "/v1/models/digits", timeout=10).json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert requests.get(rest + "/v1/models/digits/versions/1", timeout=10).status_code == 200
    metadata = requests.get(rest + "/v1/models/digits/metadata", timeout=10).json()
    assert metadata["model_spec"]["version"] == "1"
    inputs = metadata["metadata"]["signature_def"]["signatureDef"]["serving_default"]["inputs"]
    assert inputs["image"]["dtype"] == "DT_FLOAT"


def test_rest_predict_row_and_columnar_formats(model_server, test_digits):
    rest, _ = model_server
    images, labels = test_digits
    rows = requests.post(rest + "/v1/models/digits:predict", timeout=30,
                         json={"instances": images[:4].tolist()}).json()["predictions"]
    assert [row["digit"] for row in rows] == [int(d) for d in np.argmax(
        [row["probabilities"] for row in rows], axis=1)]
    named_rows = requests.post(rest + "/v1/models/digits/versions/1:predict", timeout=30,
                               json={"instances": [{"image": im} for im in images[:4].tolist()]})
    assert named_rows.json()["predictions"] == rows
    columns = requests.post(rest + "/v1/models/digits:predict", timeout=30,
                            json={"inputs": {"image": images[:4].tolist()}}).json()["outputs"]
    assert columns["digit"] == [row["digit"] for row in rows]
    assert np.allclose(columns["probabilities"], [row["probabilities"] for row in rows], atol=1e-5)


def test_rest_errors_are_json_with_tf_serving_codes(model_server):
    rest, _ = model_server
    missing = requests.get(rest + "/v1/models/nosuchmodel", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    no_version = requests.post(rest + "/v1/models/digits/versions/7:predict", timeout=10,
                               json={"instances": [[[0.0] * 28] * 28]})
    assert no_version.status_code == 404
    bad = requests.post(rest + "/v1/models/digits:predict", timeout=10, json={"instances": "x"})
    assert bad.status_code == 400 and "error" in bad.json()
    both = requests.post(rest + "/v1/models/digits:predict", timeout=10,
                         json={"instances": [1], "inputs": [1]})
    assert both.status_code == 400
