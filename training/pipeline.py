"""The TFX-style end of every training job: verify the export, bless it, push it."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.tfserving.versions import GRAPH_FILE, WARMUP_FILE, latest_version, pushed_versions
from training.push import LatestChanged, push_version

EXIT_PUSHED, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_BLESSED = 0, 1, 2, 3


class ExportBroken(RuntimeError):
    """The SavedModel did not load and run in a fresh process through the session loader."""


@dataclass
class Blessing:
    blessed: bool
    reason: str


def bless(metric: str, value: float, baseline: float | None, *, threshold: float,
          max_regression: float, higher_is_better: bool = True) -> Blessing:
    """A value threshold, then a change threshold against the latest pushed version."""
    sign = 1 if higher_is_better else -1
    word = "below" if higher_is_better else "above"
    if not math.isfinite(value):  # NaN passes every comparison: a diverged run must not
        return Blessing(False, f"{metric} is {value}: training diverged")
    if sign * (value - threshold) < 0:
        return Blessing(False, f"{metric} {value:.4f} is {word} the threshold {threshold:.4f}")
    # Exactly max_regression worse is allowed: 0.991 against 0.992 is 0.0010000000000000009 in floats.
    if baseline is not None and sign * (value - baseline) < -max_regression - 1e-9:
        return Blessing(False, f"{metric} {value:.4f} is worse than the pushed version's "
                               f"{baseline:.4f} by more than {max_regression:.4f}")
    against = "" if baseline is None else f", pushed version had {baseline:.4f}"
    return Blessing(True, f"{metric} {value:.4f} (threshold {threshold:.4f}{against})")


def write_warmup_requests(export_dir: Path, model_name: str, examples: list[dict]) -> None:
    """Write TF Serving warmup records: one PredictionLog per example request. An example may
    name its signature under the key "__signature__" (default serving_default)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = Path(export_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            inputs = dict(example)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = inputs.pop("__signature__", "serving_default")
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def set_method_name(export_dir: Path, signature: str, method_name: str) -> None:
    """Give a signature TF Serving's method name (Keras exports every one as predict), so that
    Classify and Regress accept it even with --enable_signature_method_name_check. Rewritten
    atomically, before anything reads the export."""
    from tensorflow.core.protobuf import saved_model_pb2

    graph = Path(export_dir) / GRAPH_FILE
    saved_model = saved_model_pb2.SavedModel.FromString(graph.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        meta_graph.signature_def[signature].method_name = method_name
    staged = graph.with_name(graph.name + ".partial")
    staged.write_bytes(saved_model.SerializeToString())
    os.replace(staged, graph)


def saved_model_cli_run(export_dir: Path, inputs: dict[str, np.ndarray],
                        signature: str = "serving_default",
                        input_examples: str | None = None) -> subprocess.CompletedProcess:
    """`saved_model_cli run` in a fresh process: the session loader that TF Serving uses.
    `input_examples`: saved_model_cli's --input_examples, tf.Examples it serializes itself
    (`inputs=[{"feature": [values]}]`), for a signature that takes them."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for key, value in inputs.items():
            np.save(Path(tmp) / f"{key}.npy", value)
            files.append(f"{key}={Path(tmp) / key}.npy")
        cmd = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
               "--dir", str(export_dir), "--tag_set", "serve", "--signature_def", signature]
        if files:
            cmd += ["--inputs", ";".join(files)]
        if input_examples:
            cmd += ["--input_examples", input_examples]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def verify_export(export_dir: Path, inputs: dict[str, np.ndarray], expect_outputs: list[str],
                  signature: str = "serving_default", input_examples: str | None = None) -> str:
    """Fail unless the export loads and runs `signature` in a fresh process and returns
    `expect_outputs`."""
    result = saved_model_cli_run(export_dir, inputs, signature, input_examples)
    missing = [name for name in expect_outputs if f"Result for output key {name}" not in result.stdout]
    if result.returncode != 0 or missing:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ExportBroken(f"saved_model_cli run failed on {export_dir}:\n{tail}")
    return result.stdout


def batches(*arrays, size: int = 500):
    """Arrays as a batched tf.data.Dataset, for Keras: given numpy arrays, Keras slices them with
    a parallel map, which op determinism (the digits job's) rewrites with an error-level line."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0]).batch(size)


def make_run_dir(runs_dir: Path, name: str) -> Path:
    """A new runs/<name>/<time>/ folder; runs started in the same second get -2, -3, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (runs_dir / name).mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        run_dir = runs_dir / name / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue


def whole_intervals(name: str, steps: int, eval_every: int) -> tuple[int, int]:
    """(steps, eval_every) for a --steps override: training runs whole evaluation intervals (Keras
    epochs), so steps that are not a multiple of the interval are rounded up to one, and said."""
    eval_every = min(eval_every, steps)
    whole = -(-steps // eval_every) * eval_every
    if whole != steps:
        print(f"{name}: --steps {steps} is not a multiple of the {eval_every}-step evaluation "
              f"interval: training {whole} steps", flush=True)
    return whole, eval_every


Judge = Callable[[Path | None], tuple[dict, Blessing]]


def judge_against_newest_loadable(name: str, model_dir: Path, judge: Judge) -> tuple[dict, Blessing]:
    """`judge(version folder)` against the newest pushed version that a model server can load (one
    that TF Serving's session loader fails on is skipped, as model servers skip it), or
    `judge(None)` when none can: then nothing serves, and the candidate need only pass the value
    threshold. A version that loads but fails to evaluate fails the run instead."""
    from serving.tfserving.session import first_line, load_session

    skipped = []
    for version in reversed(pushed_versions(model_dir)):
        try:
            load_session(model_dir / str(version)).close()  # the loader model servers use
        except Exception as error:  # noqa: BLE001 - whatever stops the loader stops a model server
            print(f"{name}: version {version} cannot be loaded ({first_line(error)[:200]}): "
                  f"judging against the version before it", flush=True)
            skipped.append(version)
            continue
        baseline, blessing = judge(model_dir / str(version))
        break
    else:
        version = None
        baseline, blessing = judge(None)
    return {**baseline, "baseline_version": version, "baseline_skipped_versions": skipped}, blessing


def finish(name: str, run_dir: Path, export_dir: Path, model_dir: Path, metrics: dict,
           judge: Judge, describe: str) -> int:
    """Bless the candidate against the newest pushed version (`judge` returns the baseline's
    metrics and the blessing), push it when blessed, record the outcome in metrics.json, print
    one summary line. If another version lands between judging and pushing, judge again."""
    while True:
        latest = latest_version(model_dir)
        baseline, blessing = judge_against_newest_loadable(name, model_dir, judge)
        if not blessing.blessed:
            break
        try:
            version = push_version(export_dir, model_dir, expect_latest=latest)
            break
        except LatestChanged as changed:
            print(f"{name}: pushed meanwhile by someone else: {changed}; judging again", flush=True)
    metrics.update(baseline)
    metrics["blessing"] = {"blessed": blessing.blessed, "reason": blessing.reason}
    if blessing.blessed:
        metrics["pushed_version"] = version
        line = f"{name}: pushed version {version} to {model_dir / str(version)}: {describe}"
        code = EXIT_PUSHED
    else:
        metrics["pushed_version"] = None
        line = f"{name}: not pushed: {blessing.reason}"
        code = EXIT_NOT_BLESSED
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable) + "\n")
    print(line, flush=True)
    return code


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
