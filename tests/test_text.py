"""Shakespeare end to end: a tiny GRU trained in the session, generation inside the graph,
called through HTTP -> gateway -> gRPC -> embedded model server."""

import math
import re
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
from conftest import ROOT, SONNETS, run_training

from training.bard import generation_inputs
from training.pipeline import saved_model_cli_run


def generate(gateway, **body) -> requests.Response:
    return requests.post(gateway.url + "/v1/text/generate", json=body, timeout=60)


def stream_events(response) -> list[tuple[str, str]]:
    events, event = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, line[6:]))
    return events


def test_training_reports_validation_loss_in_nats_and_bits(trained_bard):
    metrics = trained_bard.metrics
    assert metrics["pushed_version"] == 1
    assert 0 < metrics["validation_loss_nats"] < 3.0  # far below uniform: ln(60) = 4.1 nats
    assert metrics["validation_bits_per_char"] == pytest.approx(metrics["validation_loss_nats"] / math.log(2))
    assert metrics["validation"] == "the last 8% of the text"
    assert re.search(r"bard: pushed version 1 to .*bard/1: validation loss \d\.\d+ nats/char",
                     trained_bard.result.stdout)


def test_export_generates_in_a_fresh_process_through_the_session_loader(trained_bard):
    first = saved_model_cli_run(trained_bard.version_dir, {"prompt": np.array([b"ROMEO:", b"O"]),
                                                           **generation_inputs(2, 25, top_k=5, seed=3)})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Result for output key text" in first.stdout and "Result for output key state" in first.stdout
    state_size = 64  # quick profile: one GRU layer of 64 units
    more = saved_model_cli_run(trained_bard.version_dir, {
        "state": np.zeros((1, state_size), np.float32), "position": np.array([25], np.int32),
        **generation_inputs(1, 25, top_k=5, seed=3)},
        signature="continue")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "Result for output key text" in more.stdout


def test_signatures_match_the_design(trained_bard):
    show = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
                           "--dir", str(trained_bard.version_dir), "--all"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    text = " ".join(show.stdout.split())
    for expected in ["inputs['prompt'] tensor_info: dtype: DT_STRING shape: (-1)",
                     "inputs['max_chars'] tensor_info: dtype: DT_INT32 shape: (-1)",
                     "inputs['temperature'] tensor_info: dtype: DT_FLOAT shape: (-1)",
                     "inputs['top_k'] tensor_info: dtype: DT_INT32 shape: (-1)",
                     "inputs['seed'] tensor_info: dtype: DT_INT64 shape: (-1)",
                     "outputs['text'] tensor_info: dtype: DT_STRING shape: (-1)",
                     "outputs['state'] tensor_info: dtype: DT_FLOAT shape: (-1, 64)",
                     "signature_def['continue']", "signature_def['score']"]:
        assert expected in text


def test_generation_returns_max_chars_characters_from_the_training_alphabet(gateway):
    response = generate(gateway, prompt="ROMEO:", max_chars=200, seed=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "bard", "version": 1}
    assert body["prompt"] == "ROMEO:" and body["seed"] == 1
    assert len(body["text"]) == 200
    assert set(body["text"]) <= set(SONNETS.read_text())


def test_same_seed_same_text_different_seed_different_text(gateway):
    a = generate(gateway, prompt="Shall I", max_chars=150, seed=42).json()["text"]
    b = generate(gateway, prompt="Shall I", max_chars=150, seed=42).json()["text"]
    c = generate(gateway, prompt="Shall I", max_chars=150, seed=43).json()["text"]
    assert a == b
    assert a != c


def test_without_a_seed_the_response_says_which_seed_was_used(gateway):
    body = generate(gateway, prompt="Love", max_chars=60).json()
    again = generate(gateway, prompt="Love", max_chars=60, seed=body["seed"]).json()
    assert again["text"] == body["text"]


def test_random_seeds_are_integers_every_json_client_holds_exactly(gateway):
    seeds = [generate(gateway, prompt="Love", max_chars=1).json()["seed"] for _ in range(20)]
    assert all(isinstance(seed, int) and 0 <= seed <= 2**53 - 1 for seed in seeds)
    assert len(set(seeds)) == 20  # random, not one fixed value


def test_streamed_chunks_join_into_the_one_call_text(gateway):
    params = {"prompt": "When I do count", "max_chars": 300, "temperature": 0.9, "top_k": 10, "seed": 5}
    whole = generate(gateway, **params).json()["text"]
    with requests.post(gateway.url + "/v1/text/generate", json={**params, "stream": True},
                       stream=True, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = stream_events(response)
    import json

    chunks = [json.loads(data)["text"] for event, data in events if event == "chunk"]
    assert len(chunks) == math.ceil(300 / gateway.settings.stream_chunk_chars)  # it grew event by event
    assert "".join(chunks) == whole
    final_event, final = events[-1]
    assert final_event == "done"
    assert json.loads(final)["model"] == {"name": "bard", "version": 1}


def test_requests_batched_together_write_what_each_writes_alone(trained_bard):
    """TF Serving's batching merges requests: every row keeps its own parameters and seed, and a
    row that asks for fewer characters ends with its own state, ready to be continued."""
    import tensorflow as tf

    generate = tf.saved_model.load(str(trained_bard.version_dir)).signatures["serving_default"]

    def run(prompts, **inputs):
        out = generate(prompt=tf.constant(prompts), **{k: tf.constant(v) for k, v in inputs.items()})
        return [t.decode() for t in out["text"].numpy()], out["state"].numpy()

    together = generation_inputs(2, 60, top_k=4, seed=7)
    together["max_chars"][1], together["seed"][1], together["temperature"][1] = 15, 99, 1.5
    texts, states = run([b"ROMEO:", b"A much longer prompt"], **together)
    for row, prompt in enumerate([b"ROMEO:", b"A much longer prompt"]):
        [alone], state = run([prompt], **{k: v[row:row + 1] for k, v in together.items()})
        assert texts[row] == alone and len(alone) == together["max_chars"][row]
        np.testing.assert_allclose(states[row], state[0], atol=1e-5)


def test_asking_for_no_characters_writes_none_alone_or_batched(trained_bard):
    """max_chars 0 (or below, clipped to 0) writes nothing and keeps the prompt's state, alone as
    in a batch: a batch in which no row writes anything must not fail."""
    import tensorflow as tf

    model = tf.saved_model.load(str(trained_bard.version_dir))
    generate, resume = model.signatures["serving_default"], model.signatures["continue"]

    def run(signature, max_chars, **extra):
        inputs = generation_inputs(len(max_chars), 1, seed=5)
        inputs["max_chars"] = np.array(max_chars, np.int32)
        out = signature(**{k: tf.constant(v) for k, v in {**inputs, **extra}.items()})
        return [t.decode() for t in out["text"].numpy()], out["state"].numpy()

    prompts = {"prompt": np.array([b"ROMEO:", b"ROMEO:"])}
    texts, states = run(generate, [0, -5], **prompts)
    assert texts == ["", ""]
    _, after_three = run(generate, [3, 0], **prompts)
    np.testing.assert_allclose(states[0], after_three[1], atol=1e-6)  # the prompt's own state
    texts, _ = run(resume, [0], state=states[:1], position=np.zeros(1, np.int32))
    assert texts == [""]


def test_top_k_of_one_is_greedy_so_the_seed_no_longer_matters(gateway):
    a = generate(gateway, prompt="Shall I", max_chars=80, top_k=1, seed=1).json()["text"]
    b = generate(gateway, prompt="Shall I", max_chars=80, top_k=1, seed=2).json()["text"]
    assert a == b


def test_accept_event_stream_header_asks_for_a_stream(gateway):
    with requests.post(gateway.url + "/v1/text/generate", json={"prompt": "O", "max_chars": 50, "seed": 1},
                       headers={"Accept": "text/event-stream"}, stream=True, timeout=60) as response:
        events = stream_events(response)
    assert [e for e, _ in events][-1] == "done"


def test_client_that_disconnects_stops_the_generation(gateway):
    counter = 'scribe_generation_chunks_total '

    def chunks_so_far() -> float:
        metrics = requests.get(gateway.url + "/metrics", timeout=10).text
        return float(next(line for line in metrics.splitlines() if line.startswith(counter)).split()[-1])

    before = chunks_so_far()
    response = requests.post(gateway.url + "/v1/text/generate", stream=True, timeout=60,
                             json={"prompt": "A", "max_chars": 2000, "seed": 1, "stream": True})
    next(response.iter_lines())
    response.close()  # the client goes away after the first event
    time.sleep(2)
    settled = chunks_so_far()
    time.sleep(1)
    assert chunks_so_far() == settled
    assert settled - before <= 4  # the first chunk, and at most a few written into socket buffers


@pytest.mark.parametrize("prompt", ["", "x" * 4000, "ROMEO: ¿Qué? 🎭 \u0000\u200b\t", "\ud83c\udfad"])
def test_prompt_edge_cases_generate_text(gateway, prompt):
    """Empty prompts start from the initial state; characters outside the alphabet (or beyond
    the Basic Multilingual Plane) are read as spaces; nothing crashes."""
    response = generate(gateway, prompt=prompt, max_chars=30, seed=1)
    assert response.status_code == 200, response.text
    assert len(response.json()["text"]) == 30


@pytest.mark.parametrize("body, status, code", [
    ({"prompt": "x" * 4001}, 413, "prompt_too_long"),
    ({}, 400, "bad_request"),
    ({"prompt": 5}, 400, "bad_request"),
    ({"prompt": None}, 400, "bad_request"),
    ({"prompt": "A", "max_chars": 0}, 422, "out_of_range"),
    ({"prompt": "A", "max_chars": 2001}, 422, "out_of_range"),
    ({"prompt": "A", "max_chars": "10"}, 400, "bad_request"),
    ({"prompt": "A", "max_chars": True}, 400, "bad_request"),
    ({"prompt": "A", "max_chars": 1.5}, 400, "bad_request"),
    ({"prompt": "A", "temperature": 0}, 422, "out_of_range"),
    ({"prompt": "A", "temperature": 2.5}, 422, "out_of_range"),
    ({"prompt": "A", "temperature": "hot"}, 400, "bad_request"),
    ({"prompt": "A", "temperature": 10**400}, 422, "out_of_range"),
    ({"prompt": "A", "top_k": -1}, 422, "out_of_range"),
    ({"prompt": "A", "seed": -1}, 422, "out_of_range"),
    ({"prompt": "A", "seed": 2**64}, 422, "out_of_range"),
    ({"prompt": "A", "stream": "yes"}, 400, "bad_request"),
    ({"prompt": "A", "version": 9}, 404, "version_not_found"),
])
def test_bad_parameters_get_their_4xx(gateway, body, status, code):
    response = generate(gateway, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_non_utf8_body_and_wrong_media_type(gateway):
    url = gateway.url + "/v1/text/generate"
    bad_bytes = requests.post(url, data=b'{"prompt": "\xff\xfe"}', timeout=10,
                              headers={"Content-Type": "application/json"})
    assert bad_bytes.status_code == 400 and bad_bytes.json()["error"]["code"] == "bad_request"
    plain = requests.post(url, data=b"ROMEO:", headers={"Content-Type": "text/plain"}, timeout=10)
    assert plain.status_code == 415


def test_unknown_corpus_is_a_clear_error(tmp_path):
    result = run_training("bard", "--profile", "quick", "--corpus", str(tmp_path / "missing.txt"),
                          "--model-base", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"))
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_worse_language_model_is_not_blessed(trained_bard, tmp_path):
    from conftest import copy_model_base

    base = copy_model_base(trained_bard, tmp_path / "models")
    result = run_training("bard", "--profile", "quick", "--steps", "2", "--max-val-loss", "10",
                          "--corpus", str(SONNETS), "--model-base", str(base),
                          "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not pushed: validation loss" in result.stdout and "worse than the pushed version" in result.stdout
    assert sorted(p.name for p in (base / "bard").iterdir() if p.name.isdigit()) == ["1"]


def test_a_stream_outliving_its_version_continues_on_the_new_one(trained_bard, tmp_path):
    """A rollout unloads the version that started a stream: the stream carries on, no error."""
    import json
    import shutil

    from conftest import LiveGateway, copy_model_base

    from serving.gateway.text_api import events
    from training.push import push_version

    base = copy_model_base(trained_bard, tmp_path / "models")
    live = LiveGateway(base, stream_chunk_chars=10)
    try:
        manager = live.embedded.manager
        assert manager.wait_until_available(["bard"], timeout=60)
        gateway = live.app.extensions["scribe"]
        params = {"prompt": "ROMEO:", "max_chars": 40, "temperature": 0.8, "top_k": 0, "seed": 4}
        with live.app.test_request_context():
            first, served = gateway.client.predict("bard", {
                "prompt": np.array([b"ROMEO:"]), **generation_inputs(1, 10, seed=4)})
            assert served == 1
            export = tmp_path / "export"
            shutil.copytree(base / "bard" / "1", export)
            assert push_version(export, base / "bard") == 2
            deadline = time.monotonic() + 60
            while 1 in manager.models["bard"].loaded or 2 not in manager.models["bard"].loaded:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            stream = list(events(gateway, params, first, served, 10, pinned=False))
    finally:
        live.close()
    kinds = [event.split("\n")[0] for event in stream]
    assert kinds == ["event: chunk"] * 4 + ["event: done"]
    done = json.loads(stream[-1].split("data: ", 1)[1])
    assert done["versions"] == [1, 2] and len(done["text"]) == 40


def test_the_model_server_refuses_a_float_for_an_integer_input(gateway):
    """As TF Serving does: max_chars is int32, and 1.5 is not quietly turned into 1."""
    client = gateway.app.extensions["scribe"].client
    inputs = {"prompt": np.array([b"ROMEO:"]), **generation_inputs(1, 5, seed=1)}
    outputs, _ = client.predict("bard", inputs)
    assert len(outputs["text"][0]) > 0
    with pytest.raises(grpc.RpcError) as refused:
        client.predict("bard", {**inputs, "max_chars": np.array([1.5])})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_chars" in refused.value.details()
