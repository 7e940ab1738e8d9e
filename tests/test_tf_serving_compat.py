"""The embedded model server behaves as tensorflow_model_server does where TF Serving's own
end-to-end suite looks: version folders with leading zeros, every flag of TF Serving 2.19, the
estimator-style Classify, Regress and MultiInference APIs over gRPC and REST, config files in
full text format, TF Serving's error for a bad config, feeds whose shape differs from the
placeholder's, and the models loaded before the ports open."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import ROOT, ModelServerProcess, free_port
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving.model_server.flags import FLAGS
from serving.tfserving.configs import read_batching_parameters, read_model_config, read_monitoring_config
from serving.tfserving.versions import version_folders
from training.mnist_data import load_digits

# Every flag `tensorflow_model_server --help` lists in TF Serving 2.19.0
# (tensorflow_serving/model_servers/main.cc).
TF_SERVING_FLAGS = """port grpc_socket_path rest_api_port rest_api_num_threads rest_api_timeout_in_ms
rest_api_enable_cors_support enable_batching enable_per_model_batching_parameters
allow_version_labels_for_unavailable_models batching_parameters_file model_config_file
model_config_file_poll_wait_seconds model_name model_base_path num_load_threads num_unload_threads
max_num_load_retries load_retry_interval_micros file_system_poll_wait_seconds flush_filesystem_caches
tensorflow_session_parallelism tensorflow_intra_op_parallelism tensorflow_inter_op_parallelism
ssl_config_file use_alts_credentials platform_config_file saved_model_tags grpc_channel_arguments
grpc_max_threads enable_model_warmup num_request_iterations_for_warmup version monitoring_config_file
tensorflow_session_config_file prefer_tflite_model num_tflite_pools num_tflite_interpreters_per_pool
enable_signature_method_name_check xla_cpu_compilation_enabled xla_gpu_compilation_enabled
per_process_gpu_memory_fraction remove_unused_fields_from_bundle_metagraph
thread_pool_factory_config_file mixed_precision skip_initialize_tpu enable_grpc_healthcheck_service
enable_profiler enable_serialization_as_tensor_content""".split()


def half_plus_two(folder) -> None:
    """A TF1 SavedModel as TF Serving's testdata builds it: y = 0.5 x + 2 for x of shape
    (None, 1), with predict, classify and regress signatures, the last two over tf.Examples."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        a, b = tf.Variable(0.5, name="a"), tf.Variable(2.0, name="b")
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        x_from_example = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        y, y_from_example = tf.add(a * x, b, name="y"), a * x_from_example + b
        session.run(tf.compat.v1.global_variables_initializer())
        info = tf.compat.v1.saved_model.utils.build_tensor_info
        signature = tf.compat.v1.saved_model.signature_def_utils.build_signature_def
        builder = tf.compat.v1.saved_model.Builder(str(folder))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={
            "serving_default": signature({"x": info(x)}, {"y": info(y)}, "tensorflow/serving/predict"),
            "classify_x_to_y": signature({"inputs": info(serialized)}, {"scores": info(y_from_example)},
                                         "tensorflow/serving/classify"),
            "regress_x_to_y": signature({"inputs": info(serialized)}, {"outputs": info(y_from_example)},
                                        "tensorflow/serving/regress"),
        })
        builder.save()


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """half_plus_two's base path, its one version in a folder named with leading zeros."""
    base = tmp_path_factory.mktemp("half_plus_two")
    half_plus_two(base / "00000123")
    return base


@pytest.fixture(scope="module")
def server(halves, tmp_path_factory):
    """`python -m serving.model_server` with the flags TF Serving's own test starts it with."""
    grpc_port, rest_port = free_port(), free_port()
    socket_path = tmp_path_factory.mktemp("socket") / "tf-serving.sock"
    process = ModelServerProcess(
        f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--rest_api_timeout_in_ms=5000",
        f"--grpc_socket_path={socket_path}", "--model_name=default", f"--model_base_path={halves}",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb",
        "--enable_batching").start()
    process.wait_until(lambda: process.bound_at is not None, 120, "never listened")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield channel, f"http://127.0.0.1:{rest_port}", socket_path, process
    channel.close()
    process.stop()


def example(x: float) -> tf.train.Example:
    return tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[x]))}))


def test_every_tf_serving_flag_is_taken():
    assert sorted(flag.name for flag in FLAGS) == sorted(TF_SERVING_FLAGS)


def test_a_version_folder_with_leading_zeros_is_that_version(halves, tmp_path):
    assert {v: p.name for v, p in version_folders(halves).items()} == {123: "00000123"}
    shutil.copytree(halves / "00000123", tmp_path / "0007")
    shutil.copytree(halves / "00000123", tmp_path / "7")  # the same version twice: the plain name
    (tmp_path / "0x8").mkdir()  # not a version
    assert {v: p.name for v, p in version_folders(tmp_path).items()} == {7: "7"}


def test_the_models_load_before_the_port_opens(server):
    """The first status request that reaches the server finds the version AVAILABLE."""
    channel, *_ = server
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=20)
    assert [(s.version, s.state) for s in status.model_version_status] == [(123, 30)]


def test_a_feed_of_another_shape_than_the_placeholder_runs_as_in_tf_serving(server):
    channel, rest, *_ = server
    predict = rest + "/v1/models/default:predict"
    answer = requests.post(predict, json={"instances": [2.0, 3.0, 4.0]}, timeout=20)
    assert answer.json() == {"predictions": [3.0, 3.5, 4.0]}
    columns = requests.post(predict, json={"inputs": [2.0, 3.0, 4.0]}, timeout=20)
    assert columns.json() == {"outputs": [3.0, 3.5, 4.0]}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "default"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([2.0], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=20)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [3.0]
    assert response.model_spec.version.value == 123


def test_grpc_also_listens_on_the_unix_socket(server):
    _, _, socket_path, _ = server
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "default"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[4.0]], np.float32)))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=20)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[4.0]]


def test_classify_regress_and_multi_inference_over_grpc(server):
    channel, *_ = server
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "default", "classify_x_to_y"
    request.input.example_list.examples.add().CopyFrom(example(2.0))
    classified = stub.Classify(request, timeout=20)
    rows = classified.result.classifications
    assert [[(c.label, c.score) for c in row.classes] for row in rows] == [[("", 3.0)]]
    spec = classified.model_spec
    assert (spec.version.value, spec.signature_name) == (123, "classify_x_to_y")

    request = regression_pb2.RegressionRequest()
    request.model_spec.name, request.model_spec.signature_name = "default", "regress_x_to_y"
    request.input.example_list_with_context.context.CopyFrom(example(1.0))  # each example overrides it
    request.input.example_list_with_context.examples.add().CopyFrom(example(4.0))
    assert [r.value for r in stub.Regress(request, timeout=20).result.regressions] == [4.0]

    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "regress"), ("classify_x_to_y", "classify")):
        task = multi.tasks.add(method_name=f"tensorflow/serving/{method}")
        task.model_spec.name, task.model_spec.signature_name = "default", signature
    multi.input.example_list.examples.add().CopyFrom(example(2.0))
    results = stub.MultiInference(multi, timeout=20).results
    assert results[0].regression_result.regressions[0].value == 3.0
    assert results[1].classification_result.classifications[0].classes[0].score == 3.0


def test_classify_and_regress_refuse_a_signature_that_takes_no_examples(server):
    channel, *_ = server
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "default"  # serving_default: x, not serialized examples
    request.input.example_list.examples.add().CopyFrom(example(2.0))
    with pytest.raises(grpc.RpcError) as refused:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Regress(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "No regress inputs found in SignatureDef" in refused.value.details()


def test_classify_and_regress_over_rest(server):
    _, rest, *_ = server
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert requests.post(rest + "/v1/models/default:classify", json=body, timeout=20).json() == {
        "results": [[["", 3.0]]]}
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}, {"x": 6.0}]}
    assert requests.post(rest + "/v1/models/default/versions/123:regress", json=body, timeout=20).json() == {
        "results": [3.0, 5.0]}
    refused = requests.post(rest + "/v1/models/default:regress", json={"examples": "x"}, timeout=20)
    assert refused.status_code == 400 and "examples" in refused.json()["error"]


def test_the_digits_model_classifies_tf_examples_as_it_predicts(trained, tmp_path):
    """The digits export's classification signature: 784 pixels as the float feature `image`."""
    images = load_digits("mnist-5k").x_test[:3]
    grpc_port, rest_port = free_port(), free_port()
    process = ModelServerProcess(f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                                 "--model_config_file=serving/models.config",
                                 f"--base_path_map=/models={trained.model_base}",
                                 "--enable_signature_method_name_check").start()
    try:
        process.wait_until(lambda: process.bound_at is not None, 120, "never listened")
        predicted = requests.post(f"http://127.0.0.1:{rest_port}/v1/models/digits:predict",
                                  json={"instances": images.tolist()}, timeout=30).json()["predictions"]
        body = {"signature_name": "classification",
                "examples": [{"image": image.ravel().tolist()} for image in images]}
        classified = requests.post(f"http://127.0.0.1:{rest_port}/v1/models/digits:classify",
                                   json=body, timeout=30).json()["results"]
    finally:
        process.stop()
    for row, prediction in zip(classified, predicted, strict=True):
        assert [label for label, _ in row] == [str(d) for d in range(10)]
        assert np.allclose([score for _, score in row], prediction["probabilities"], atol=1e-6)


def test_config_files_are_read_in_full_text_format(tmp_path):
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config: {\n  enable: true,  # TF Serving\'s own file has the colon\n'
                          "  path: '/metrics'\n}\n")
    assert read_monitoring_config(monitoring) == "/metrics"
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size: { value: 8 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 8\n"
                        "batch_timeout_micros { value: 5 }  # comment\npad_variable_length_inputs: true\n")
    assert read_batching_parameters(batching) == {"max_batch_size": 8, "batch_timeout_micros": 5,
                                                  "allowed_batch_sizes": [2, 8],
                                                  "pad_variable_length_inputs": True}
    batching.write_text("max_batch_size { value: 8 } unknown_field: 1")
    with pytest.raises(ValueError, match="Error parsing text-format tensorflow.serving.BatchingParameters"):
        read_batching_parameters(batching)
    assert [m.name for m in read_model_config(ROOT / "serving" / "models.config").model_config_list.config] \
        == ["digits", "digits-softmax", "digits-dense", "digits-conv", "digits-conv-dropout", "bard"]


def test_a_bad_model_config_is_tf_serving_s_error_and_a_failed_start(tmp_path):
    config = tmp_path / "bad.config"
    config.write_text('model_config_list { config { name: "x" base_path: 3 }')
    done = subprocess.run([sys.executable, "-m", "serving.model_server", f"--model_config_file={config}",
                           f"--port={free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_version_flag_prints_and_exits():
    done = subprocess.run([sys.executable, "-m", "serving.model_server", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("TensorFlow ModelServer: 2.19.0")


def test_cors_and_the_health_service_when_asked_for(halves):
    from serving.model_server.health import SERVING, HealthCheckRequest, HealthCheckResponse

    grpc_port, rest_port = free_port(), free_port()
    process = ModelServerProcess(f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                                 "--model_name=half", f"--model_base_path={halves}",
                                 "--rest_api_enable_cors_support=true",
                                 "--enable_grpc_healthcheck_service").start()
    try:
        process.wait_until(lambda: process.bound_at is not None, 120, "never listened")
        answer = requests.get(f"http://127.0.0.1:{rest_port}/v1/models/half", timeout=20)
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=HealthCheckRequest.SerializeToString,
                                        response_deserializer=HealthCheckResponse.FromString)
            assert check(HealthCheckRequest(service=""), timeout=20).status == SERVING
    finally:
        process.stop()
    assert json.dumps(process.log).count("has no effect") == 0  # real flags, no notes


def test_the_model_server_page_lists_every_flag():
    page = (ROOT / "docs" / "model-server.md").read_text()
    assert not [flag.name for flag in FLAGS if f"`--{flag.name}`" not in page]
