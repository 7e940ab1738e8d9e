"""Dynamic batching in the embedded model server, with TF Serving's batching parameters."""

import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import ROOT, copy_model_base
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.model_server import start_model_server
from serving.tfserving.batching import DynamicBatcher, QueueFull
from training.mnist_data import load_digits


@pytest.fixture(scope="module")
def batching_server(trained, trained_bard, tmp_path_factory):
    base = tmp_path_factory.mktemp("batching") / "models"
    copy_model_base(trained, base)
    copy_model_base(trained_bard, base)
    server = start_model_server(ROOT / "serving" / "models.config", {"/models": str(base)},
                                grpc_port=0, rest_port=0, host="127.0.0.1", batching={
                                    # 0.2 s: the concurrent requests below must all arrive
                                    # within it, also on a slow, busy machine
                                    "max_batch_size": 64, "batch_timeout_micros": 200_000,
                                    "num_batch_threads": 1})
    assert server.manager.wait_until_available(["digits", "bard"], timeout=120)
    yield server
    server.stop()


def predict(port: int, images: np.ndarray) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["probabilities"])


def all_at_once(call, arguments: list) -> list:
    """call(argument) for every argument, each on its own thread, released together."""
    results = [None] * len(arguments)
    start = threading.Barrier(len(arguments))

    def one(i):
        start.wait()
        results[i] = call(arguments[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(arguments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_concurrent_requests_share_model_runs_and_get_their_own_rows(batching_server):
    images = load_digits("mnist-5k").x_test[:24]
    alone = batching_server.manager.servable("digits")._run("serving_default", {"image": images})
    batcher = batching_server.manager.servable("digits").batchers["serving_default"]
    runs_before, requests_before = batcher.batches_run, batcher.requests_run
    results = all_at_once(lambda i: predict(batching_server.grpc_port, images[i:i + 1])[0],
                          list(range(len(images))))
    assert np.allclose(np.stack(results), alone["probabilities"], atol=1e-5)
    assert batcher.requests_run - requests_before == len(images)
    assert batcher.batches_run - runs_before < len(images) / 2  # they shared model runs


def test_rest_prompts_of_different_lengths_share_model_runs(batching_server):
    """numpy gives text a dtype per length; prompts must still batch together, each row
    generating what it generates alone."""
    url = f"http://127.0.0.1:{batching_server.rest_port}/v1/models/bard:predict"
    prompts = ["O", "ROMEO:", "Shall I compare thee", "To be, or not to be, that is"] * 2

    def generate(prompt: str) -> str:
        response = requests.post(url, timeout=60, json={"instances": [
            {"prompt": prompt, "max_chars": 20, "temperature": 1.0, "top_k": 5, "seed": 3}]})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["text"]

    alone = {prompt: generate(prompt) for prompt in set(prompts)}
    batcher = batching_server.manager.servable("bard").batchers["serving_default"]
    runs_before, requests_before = batcher.batches_run, batcher.requests_run
    texts = all_at_once(generate, prompts)
    assert texts == [alone[prompt] for prompt in prompts]
    assert batcher.requests_run - requests_before == len(prompts)
    assert batcher.batches_run - runs_before < len(set(prompts))  # lengths shared runs


def test_one_request_s_bad_input_fails_only_that_request_not_its_batch(batching_server):
    """The server's own input checks judge each request before it joins a batch: a value that
    does not fit int32 is refused, and the prompt batched with it still generates."""
    url = f"http://127.0.0.1:{batching_server.rest_port}/v1/models/bard:predict"

    def generate(max_chars: int) -> tuple[int, dict]:
        response = requests.post(url, timeout=60, json={"instances": [
            {"prompt": "ROMEO:", "max_chars": max_chars, "temperature": 1.0, "top_k": 5, "seed": 3}]})
        return response.status_code, response.json()

    good, bad = all_at_once(generate, [20, 2 ** 40])
    assert bad[0] == 400 and "does not fit int32" in bad[1]["error"]
    assert good[0] == 200 and len(good[1]["predictions"][0]["text"]) == 20


def test_inputs_of_different_row_counts_are_refused_as_tf_serving_s_batching_session_does(
        batching_server):
    url = f"http://127.0.0.1:{batching_server.rest_port}/v1/models/bard:predict"
    response = requests.post(url, timeout=60, json={"inputs": {
        "prompt": ["ROMEO:"], "max_chars": [5, 5], "temperature": [1.0], "top_k": [0], "seed": [1]}})
    assert response.status_code == 400
    assert "equal 0th-dimension size" in response.json()["error"]


def test_runs_and_the_queue_limit_are_shared_by_every_key():
    """As a TF Serving scheduler's threads serve all its queues: a request of another key waits
    for the one run allowed, and counts against the queue limit, instead of running at once."""
    running, release = threading.Event(), threading.Event()
    runs = []

    def run(inputs, key):
        runs.append(key)
        if key == "a":
            running.set()
            release.wait(10)
        return {"y": inputs["x"]}

    batcher = DynamicBatcher(run, {"max_batch_size": 1, "batch_timeout_micros": 0,
                                   "max_enqueued_batches": 1, "num_batch_threads": 1})
    first = threading.Thread(target=batcher.submit, args=({"x": np.array([0])}, "a"))
    first.start()
    assert running.wait(10)
    second = threading.Thread(target=batcher.submit, args=({"x": np.array([1])}, "b"))
    second.start()
    deadline = time.monotonic() + 10
    while batcher._waiting_rows < 1 and time.monotonic() < deadline:  # "b" has queued
        time.sleep(0.01)
    time.sleep(0.1)
    assert runs == ["a"]  # "b" waits for the run
    with pytest.raises(QueueFull):  # one row waiting fills the queue, whatever its key or shape
        batcher.submit({"x": np.array([[2, 2]])}, key="c")
    release.set()
    first.join(10)
    second.join(10)
    assert runs == ["a", "b"]
    assert batcher.submit({"x": np.array([3])}, key="d")["y"].tolist() == [3]  # the run was freed
    batcher.stop()


def test_signatures_with_a_batch_dimension_everywhere_are_batched(batching_server):
    # digits: images in, and serialized tf.Examples for Classify; both batch.
    assert set(batching_server.manager.servable("digits").batchers) == {"serving_default", "classification"}
    # Every bard signature takes one value per prompt, so all of them batch, as in TF Serving.
    assert set(batching_server.manager.servable("bard").batchers) == {"serving_default", "continue", "score"}


def test_a_full_queue_refuses_at_once_and_admitted_requests_finish():
    release = threading.Event()

    def slow_run(inputs, _key):
        release.wait(10)
        return {"double": inputs["x"] * 2}

    batcher = DynamicBatcher(slow_run, {"max_batch_size": 1, "batch_timeout_micros": 0,
                                        "max_enqueued_batches": 2, "num_batch_threads": 1})
    answers = []
    admitted = [threading.Thread(target=lambda i=i: answers.append(
        batcher.submit({"x": np.array([i])})["double"][0])) for i in range(3)]
    for i, thread in enumerate(admitted):
        thread.start()
        wait_until(lambda i=i: batcher._runs == 1 and batcher._waiting_rows == i)  # one runs, i wait
    started = time.monotonic()
    with pytest.raises(QueueFull):
        batcher.submit({"x": np.array([9])})
    assert time.monotonic() - started < 0.5
    release.set()
    for thread in admitted:
        thread.join(10)
    assert sorted(answers) == [0, 2, 4]
    batcher.stop()


def test_allowed_batch_sizes_pad_and_every_caller_gets_its_rows():
    seen_sizes = []

    def run(inputs, _key):
        seen_sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] + 1}

    batcher = DynamicBatcher(run, {"max_batch_size": 8, "batch_timeout_micros": 0,
                                   "allowed_batch_sizes": [4, 8], "num_batch_threads": 1})
    assert batcher.submit({"x": np.array([1, 2, 3])})["y"].tolist() == [2, 3, 4]
    assert seen_sizes == [4]
    batcher.stop()


def test_errors_reach_every_waiting_caller_and_stop_never_strands_one():
    def broken(inputs, _key):
        raise ValueError("model failed")

    batcher = DynamicBatcher(broken, {"max_batch_size": 4, "batch_timeout_micros": 1000})
    with pytest.raises(ValueError, match="model failed"):
        batcher.submit({"x": np.array([1])})
    batcher.stop()
    with pytest.raises(ValueError):  # after stop, requests still get an answer (run directly)
        batcher.submit({"x": np.array([1])})


def test_requests_run_on_their_callers_threads_and_only_share_with_their_own_key():
    running, release = threading.Event(), threading.Event()
    runs = []

    def run(inputs, key):
        runs.append((key, threading.current_thread().name, inputs["x"].ravel().tolist()))
        if inputs["x"].ravel().tolist() == [0]:
            running.set()
            release.wait(10)
        return {"y": inputs["x"] * 10}

    batcher = DynamicBatcher(run, {"max_batch_size": 8, "batch_timeout_micros": 0, "num_batch_threads": 1})
    names_before = {t.name for t in threading.enumerate()}
    answers = {}

    def caller(i, key, x):
        answers[i] = batcher.submit({"x": x}, key=key)["y"].tolist()

    # While key "a" runs [0], another [1] and [3] of key "a" wait and then share one run; key
    # "b" and a request of another shape wait too, but each runs in a batch of its own.
    submits = [("a", np.array([0])), ("a", np.array([1])), ("b", np.array([2])), ("a", np.array([3])),
               ("a", np.array([[4, 4]]))]
    threads = [threading.Thread(target=caller, args=(i, *submit), name=f"caller-{i}")
               for i, submit in enumerate(submits)]
    threads[0].start()
    assert running.wait(10)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: batcher._waiting_rows == 4)  # [1], [2], [3] and [[4, 4]] wait, a row each
    assert {t.name for t in threading.enumerate()} - names_before <= {t.name for t in threads}
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == {0: [0], 1: [10], 2: [20], 3: [30], 4: [[40, 40]]}
    assert sorted((key, values) for key, _, values in runs) == [
        ("a", [0]), ("a", [1, 3]), ("a", [4, 4]), ("b", [2])]
    assert all(name.startswith("caller-") for _, name, _ in runs)  # every run on a caller's thread
