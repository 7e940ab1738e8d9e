"""A healthy run prints no line that looks like a failure: each entry point, started as `make run`
starts it (TensorFlow's CPU build, TF_CPP_MIN_LOG_LEVEL=2 as the Makefile sets it), is read for
TensorFlow's error-level lines and the known noise of a mismatched install."""

from __future__ import annotations

import re

import requests
from conftest import ModelServerProcess, copy_model_base, free_port, predict, start_gateway
from drawings import draw_digit, png_bytes

FAILURE_LOOKING = re.compile("|".join([
    r"^[EF]\d{4} ",  # absl-style error and fatal lines (E0000 00:00:...)
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [EF] ",  # TensorFlow's own error and fatal lines
    r"cuInit|Unable to register cu|computation placer already registered",  # a GPU build on a CPU
    r"NodeDef mentions attribute",  # graphs from a newer TensorFlow than the one running them
    r"is deprecated|DeprecationWarning",
    r"Traceback \(most recent call last\)",
    r" ERROR | CRITICAL |\[ERROR\]",
]), re.MULTILINE)


def failure_looking(text: str) -> list[str]:
    return [line for line in text.splitlines() if FAILURE_LOOKING.search(line)]


def test_training_prints_no_failure_looking_line(trained, trained_bard):
    for run in (trained, trained_bard):
        assert failure_looking(run.result.stdout + run.result.stderr) == []


def test_the_model_server_prints_no_failure_looking_line(trained, trained_bard, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    copy_model_base(trained_bard, base)
    rest_port = free_port()
    server = ModelServerProcess(f"--port={free_port()}", f"--rest_api_port={rest_port}",
                                "--model_config_file=serving/models.config",
                                f"--base_path_map=/models={base}").start()
    try:
        server.wait_until(lambda: server.bound_at is not None, 180, "never listened")
        answer = requests.post(f"http://127.0.0.1:{rest_port}/v1/models/bard:predict", timeout=30, json={
            "instances": [{"prompt": "A", "max_chars": 5, "temperature": 1.0, "top_k": 0, "seed": 1}]})
        assert answer.status_code == 200
    finally:
        server.stop()
    assert failure_looking("\n".join(server.log)) == []


def test_the_gateway_prints_no_failure_looking_line(trained, trained_bard, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    copy_model_base(trained_bard, base)
    live = start_gateway(tmp_path, {"SCRIBE_MODEL_DIR": str(base)})
    try:
        assert predict(live, files={"image": png_bytes(draw_digit(3))}).status_code == 200
        written = requests.post(live.url + "/v1/text/generate", json={"prompt": "A", "max_chars": 5},
                                timeout=30)
        assert written.status_code == 200
    finally:
        live.stop()
    assert failure_looking(live.log.read_text()) == []
