"""The embedded model server speaks TF Serving's gRPC and REST APIs, started with its flags."""

import json

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import ROOT, ModelServerProcess, free_port
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
    server = ModelServerProcess(
        f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_config_file=serving/models.config",
        "--file_system_poll_wait_seconds=1", "--enable_model_warmup=true",
        f"--base_path_map=/models={trained.model_base}").start()
    rest = f"http://127.0.0.1:{rest_port}"

    def serves_digits() -> bool:
        try:
            return requests.get(rest + "/v1/models/digits", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        server.wait_until(serves_digits, 300, "the model server never served digits")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield rest, channel
        channel.close()
    finally:
        server.stop()


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
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"  # TF Serving's field names
    image = signature["inputs"]["image"]
    assert image["dtype"] == "DT_FLOAT" and image["tensor_shape"]["unknown_rank"] is False
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "28", "28"]


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


def test_rest_predict_reads_json_whatever_the_content_type(model_server, test_digits):
    """TF Serving's documentation posts with `curl -d`, which says form-urlencoded."""
    rest, _ = model_server
    body = json.dumps({"instances": test_digits[0][:2].tolist()})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        response = requests.post(rest + "/v1/models/digits:predict", data=body, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        assert [p["digit"] for p in response.json()["predictions"]] == test_digits[1][:2].tolist()


@pytest.mark.parametrize("data", [
    pytest.param(json.dumps({"instances": [[[True] * 28] * 28]}), id="bool-for-float"),
    pytest.param(json.dumps({"instances": [{"b64": 5}]}), id="b64-not-a-string"),
    pytest.param(json.dumps({"instances": [{"b64": ["YQ=="]}]}), id="b64-a-list"),
    pytest.param('{"instances": ' + "[" * 3000 + "]" * 3000 + "}", id="nested-3000-deep"),
])
def test_rest_malformed_inputs_are_400_not_500(model_server, data):
    rest, _ = model_server
    response = requests.post(rest + "/v1/models/digits:predict", data=data, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_version_0_is_a_version_not_the_latest(model_server):
    """TF Serving reads /versions/0 as Specific(digits, 0): not found, rather than the latest."""
    rest, _ = model_server
    response = requests.post(rest + "/v1/models/digits/versions/0:predict", timeout=10,
                             json={"instances": [[[0.5] * 28] * 28]})
    assert response.status_code == 404, response.text
    assert requests.get(rest + "/v1/models/digits/versions/0", timeout=10).status_code == 404


def test_grpc_a_tensor_of_no_real_dtype_is_invalid_argument(model_server, test_digits):
    _, channel = model_server
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(test_digits[0][:1]))
    for dtype in (20, 999):  # DT_RESOURCE, and a number that is no dtype at all
        request.inputs["image"].dtype = dtype
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()


def test_bard_inputs_of_the_wrong_kind_or_out_of_range_are_refused_not_wrapped(trained_bard, tmp_path):
    """numpy would wrap 2**32 + 5 round to 5 for an int32 input, and TensorFlow fails with an
    INTERNAL error on a number where text is wanted: TF Serving refuses both as INVALID_ARGUMENT."""
    from serving.model_server.servables import ServableManager, ServingError
    from serving.tfserving.configs import read_model_config
    from training.bard import generation_inputs

    manager = ServableManager(read_model_config(ROOT / "serving" / "models.config"),
                              {"/models": str(trained_bard.model_base)})
    manager.poll_once()
    bard = manager.servable("bard")
    good = {"prompt": np.array([b"ROMEO:"]), **generation_inputs(1, 5, seed=3)}
    assert len(bard.predict("serving_default", good)["text"][0]) == 5
    for change, says in [({"max_chars": np.array([2**32 + 5])}, "does not fit int32"),
                         ({"seed": np.array([2**63], np.uint64)}, "does not fit int64"),
                         ({"prompt": np.array([5])}, "must be strings"),
                         ({"prompt": np.array([5], dtype=object)}, "must be strings"),
                         ({"temperature": np.array([True])}, "must be float")]:
        with pytest.raises(ServingError) as error:
            bard.predict("serving_default", {**good, **change})
        assert error.value.code == "INVALID_ARGUMENT" and says in error.value.message, error.value.message
    with pytest.raises(ServingError) as error:  # the graph's own error, with its cause
        bard.predict("serving_default", {**good, "temperature": np.array([0.5, 0.5], np.float32)})
    assert error.value.code == "INVALID_ARGUMENT"  # e.g. "Input to reshape is a tensor with 10 values..."
    assert error.value.message != "Graph execution error:" and not error.value.message.endswith(":")


def test_prometheus_metrics_are_tf_serving_s_own_and_count_every_predict(trained, test_digits):
    """A dashboard built on TF Serving reads this server alike: TF Serving's names, labels, units
    (microseconds) and buckets, its page format, and failures counted by status, including those
    that fail before any model runs."""
    from serving.model_server import start_model_server

    path = "/monitoring/prometheus/metrics"
    server = start_model_server(ROOT / "serving" / "models.config", {"/models": str(trained.model_base)},
                                grpc_port=0, rest_port=0, host="127.0.0.1", prometheus_path=path)
    try:
        assert server.manager.wait_until_available(["digits"], timeout=120)
        rest = f"http://127.0.0.1:{server.rest_port}"
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            grpc_predict(channel, test_digits[0][:2])
            with pytest.raises(grpc.RpcError):
                grpc_predict(channel, test_digits[0][:2], name="no-such-model")
            with pytest.raises(grpc.RpcError):
                grpc_predict(channel, test_digits[0][:2], key="pixels")
        assert requests.post(rest + "/v1/models/digits:predict", timeout=30,
                             json={"instances": test_digits[0][:1].tolist()}).status_code == 200
        assert requests.post(rest + "/v1/models/digits:predict", data="{not json",
                             timeout=30).status_code == 400
        assert requests.post(rest + "/v1/models/digits:predict", json={"instances": []},
                             timeout=30).status_code == 400
        page = requests.get(rest + path, timeout=10)
    finally:
        server.stop()
    assert page.headers["Content-Type"].startswith("text/plain")
    lines = page.text.splitlines()
    counts = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
              for line in lines if line.startswith(":tensorflow:serving:request_count{")}
    assert counts == {':tensorflow:serving:request_count{model_name="digits",status="OK"}': 2,
                      ':tensorflow:serving:request_count{model_name="digits",status="INVALID_ARGUMENT"}': 3,
                      ':tensorflow:serving:request_count{model_name="unknown",status="NOT_FOUND"}': 1}
    assert "# TYPE :tensorflow:serving:request_count counter" in lines
    assert "# TYPE :tensorflow:serving:request_latency histogram" in lines
    latency = ":tensorflow:serving:request_latency"
    for entrypoint in ("GRPC", "REST"):  # one successful call each, in TF Serving's buckets
        point = f'model_name="digits",API="Predict",entrypoint="{entrypoint}"'
        buckets = [line for line in lines if line.startswith(f"{latency}_bucket{{{point},")]
        limits = [line.split('le="')[1].split('"')[0] for line in buckets]
        assert limits[:6] == ["10", "18", "32.4", "58.32", "104.976", "188.957"]
        assert len(limits) == 34 and limits[-1] == "+Inf"
        cumulative = [int(line.rsplit(" ", 1)[1]) for line in buckets]
        assert cumulative == sorted(cumulative) and cumulative[-1] == 1
        assert f"{latency}_count{{{point}}} 1" in lines
        [micros] = [float(line.split()[-1]) for line in lines if line.startswith(f"{latency}_sum{{{point}}}")]
        assert 10 < micros < 30e6  # microseconds: more than 10 µs, less than 30 s
        bucket = cumulative.index(1)  # the one call's bucket: the first limit above its time
        assert float(limits[bucket - 1]) <= micros * 1.00001 and float(limits[bucket]) > micros * 0.99999
