"""Training under tf.distribute, on this CPU: MirroredStrategy over two logical CPU devices trains
the quick model to the accuracy of one device, and two workers on localhost (TF_CONFIG, two
processes, MultiWorkerMirroredStrategy) train one model of which the chief alone pushes one
version; the worker waits for it and exits with its status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_training

from serving.tfserving.versions import pushed_versions
from training.distribute import Cluster, cluster_from_env

BAND = 0.03  # quick runs of 200 steps on 3,500 digits: seeds and replica counts move them ~1 point
QUICK_THRESHOLD = 0.90  # the quick profile's blessing floor on mnist-5k
ERROR_LINE = re.compile(r"^(E\d{4} |\S+ \S+: E )", re.MULTILINE)  # TensorFlow's error-level log lines


def test_two_logical_cpu_devices_train_the_quick_model_to_the_accuracy_of_one(trained, tmp_path):
    result = run_training("digits", "--profile", "quick", "--data", "mnist-5k", "--devices", "2",
                          "--model-base", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "runs").glob("digits/*/metrics.json")).read_text())
    assert metrics["distribution"] == "MirroredStrategy over /cpu:0, /cpu:1"
    assert trained.metrics["distribution"] == "one device"
    assert metrics["test_accuracy"] >= QUICK_THRESHOLD
    assert abs(metrics["test_accuracy"] - trained.metrics["test_accuracy"]) <= BAND, (
        metrics["test_accuracy"], trained.metrics["test_accuracy"])
    assert pushed_versions(tmp_path / "models" / "digits") == [1]


def start_workers(tmp_path: Path, *args: str, model_base: Path | None = None) -> list[subprocess.Popen]:
    """Two `python -m training digits` processes with TF_CONFIG naming both, on loopback."""
    model_base = model_base or tmp_path / "models"
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    processes = []
    for index in (1, 0):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "training", "digits", "--profile", "quick", "--data", "mnist-5k",
             "--model-base", str(model_base), "--runs-dir", str(tmp_path / "runs"), *args],
            cwd=ROOT, env={**os.environ, "TF_CONFIG": config}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return processes[::-1]  # chief (worker 0) first


def finished(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        results.append((process.returncode, output))
    return results


def test_two_workers_on_localhost_train_one_model_and_the_chief_alone_pushes_one_version(trained, tmp_path):
    (chief, chief_log), (worker, worker_log) = finished(start_workers(tmp_path))
    assert chief == 0, chief_log[-3000:]
    assert worker == 0, worker_log[-3000:]
    assert "MultiWorkerMirroredStrategy, worker 0 of 2 tasks" in chief_log
    assert "worker 1 of 2 tasks done training; waiting for the chief" in worker_log
    assert "pushed version" not in worker_log
    assert pushed_versions(tmp_path / "models" / "digits") == [1]
    runs = list((tmp_path / "runs").glob("digits/*/metrics.json"))
    assert len(runs) == 1, runs  # the worker wrote nothing where runs are kept
    metrics = json.loads(runs[0].read_text())
    assert metrics["test_accuracy"] >= QUICK_THRESHOLD
    assert abs(metrics["test_accuracy"] - trained.metrics["test_accuracy"]) <= BAND
    for log in (chief_log, worker_log):  # a clean end: no task reads the other's exit as a crash
        assert "unhealthy" not in log and not ERROR_LINE.search(log), log[-2000:]


def test_a_worker_exits_with_the_chief_s_status_when_the_chief_does_not_push(tmp_path):
    (chief, chief_log), (worker, worker_log) = finished(start_workers(tmp_path, "--steps", "100",
                                                                      "--min-accuracy", "0.9999"))
    assert chief == worker == 3, (chief_log[-2000:], worker_log[-2000:])
    assert "not pushed" in chief_log and "the chief finished with exit status 3" in worker_log
    models = tmp_path / "models" / "digits"
    assert not models.exists() or pushed_versions(models) == []


def test_when_the_chief_fails_after_training_the_worker_exits_with_its_failure(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the chief cannot push under a file")
    (chief, chief_log), (worker, worker_log) = finished(
        start_workers(tmp_path, "--steps", "100", "--min-accuracy", "0", model_base=blocked))
    assert chief == worker == 1, (chief_log[-2000:], worker_log[-2000:])
    assert "the chief finished with exit status 1" in worker_log
    assert blocked.read_text() == "the chief cannot push under a file"


@pytest.mark.parametrize(("tf_config", "expected"), [
    ("", Cluster()),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}',
     Cluster("worker", 1, 2)),
    ('{"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}}',
     Cluster("chief", 0, 2, has_chief=True)),
])
def test_tf_config_says_which_task_this_is(tf_config, expected):
    assert cluster_from_env({"TF_CONFIG": tf_config}) == expected


def test_the_chief_is_the_chief_task_else_worker_0():
    assert Cluster("worker", 0, 2).is_chief and not Cluster("worker", 1, 2).is_chief
    assert Cluster("chief", 0, 3, has_chief=True).is_chief
    assert not Cluster("worker", 0, 3, has_chief=True).is_chief


@pytest.mark.parametrize(("tf_config", "message"), [
    ("{not json", "not a valid cluster description"),
    ('{"task": {"type": "worker"}}', "not a valid cluster description"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "ps", "index": 0}}',
     "is not chief or worker"),
])
def test_a_tf_config_multi_worker_training_cannot_use_is_refused_clearly(tf_config, message):
    with pytest.raises(ValueError, match=message):
        cluster_from_env({"TF_CONFIG": tf_config})
