"""The training pipeline: train, export, verify, evaluate, bless, push."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SONNETS, copy_model_base, run_training

from serving.tfserving.versions import pushed_versions
from training import digits, pipeline
from training.pipeline import bless, saved_model_cli_run
from training.push import push_version


def test_quick_model_beats_90_percent_on_its_test_split(trained):
    assert trained.metrics["test_accuracy"] > 0.90
    assert trained.metrics["test_examples"] == 1000  # the held-out split, never trained on
    assert trained.metrics["pushed_version"] == 1


def test_summary_line_says_which_version_was_pushed(trained):
    last_line = trained.result.stdout.strip().splitlines()[-1]
    assert re.match(r"digits: pushed version 1 to .*digits/1: test accuracy \d+\.\d+%", last_line)


def test_run_writes_curves_tensorboard_logs_and_metrics(trained):
    run_dir = next(trained.runs_dir.glob("digits/*"))
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    history = trained.metrics["history"]
    assert len(history["loss"]) == len(history["val_accuracy"]) >= 2



def test_metrics_record_throughput_and_the_test_accuracy_curve(trained):
    """For benchmark 3: images per second of training steps, and test accuracy after each interval."""
    metrics = trained.metrics
    curve = metrics["test_accuracy_curve"]
    assert [p["step"] for p in curve] == [100, 200]  # quick profile: 200 steps, evaluated every 100
    seconds = [p["train_seconds"] for p in curve]
    assert 0 < seconds[0] < seconds[1] == pytest.approx(metrics["train_seconds"], abs=0.06)
    assert curve[-1]["test_accuracy"] == metrics["test_accuracy"]  # the exported model is the last point
    assert metrics["images_per_second"] == pytest.approx(200 * 100 / metrics["train_seconds"], rel=0.01)

def test_export_runs_in_a_fresh_process_through_the_session_loader(trained):
    """saved_model_cli run loads with the TF1 session loader that TF Serving uses."""
    from training.mnist_data import load_digits

    splits = load_digits("mnist-5k")
    result = saved_model_cli_run(trained.version_dir, {"image": splits.x_test[:8]})
    assert result.returncode == 0, result.stderr[-2000:]
    digits_out = re.search(r"Result for output key digit:\n\[([\d\s]+)\]", result.stdout)
    predicted = np.array(digits_out.group(1).split(), dtype=int)
    assert (predicted == splits.y_test[:8]).sum() >= 6


def test_serving_graph_folds_batch_norm_and_computes_what_keras_computes():
    """The export serves an inference graph with every batch norm folded into the layer before
    it; it must compute what the Keras model computes, and the check must see a difference."""
    import keras

    from training import digits
    from training.mnist_data import load_digits

    keras.utils.set_random_seed(3)
    model = digits.build_model()
    rng = np.random.default_rng(3)
    for layer in model.layers:  # batch norm statistics far from the identity, as after training
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.05, 4, layer.moving_variance.shape))
            layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape))
    steps, variables = digits.inference_graph(model)
    images = load_digits("mnist-5k").x_val[:32]
    assert not any(isinstance(step, keras.layers.BatchNormalization) for step in steps)
    assert len(variables) == 8  # a kernel and an offset for each of the 4 folded pairs
    assert digits.check_inference_graph(model, steps, images) < digits.MAX_SERVING_GRAPH_ERROR / 10

    variables[1].assign(variables[1].numpy() * 1.001)  # the first offset 0.1% off: export refuses
    assert digits.check_inference_graph(model, steps, images) > digits.MAX_SERVING_GRAPH_ERROR * 3

    # A layer with a bias, a norm with a scale, an odd kernel and stride: folded just as well.
    image = keras.Input((28, 28), name="image")
    x = keras.layers.Reshape((28, 28, 1))(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=True)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.ReLU()(x)))
    other = keras.Model(image, x)
    conv, norm = other.layers[2], other.layers[3]
    conv.bias.assign(rng.normal(0, 0.3, conv.bias.shape))
    norm.gamma.assign(rng.uniform(0.5, 2, 8))
    norm.beta.assign(rng.normal(0, 0.3, 8))
    norm.moving_mean.assign(rng.normal(0, 0.5, 8))
    norm.moving_variance.assign(rng.uniform(0.05, 4, 8))
    steps, variables = digits.inference_graph(other)
    assert len(variables) == 2
    assert digits.check_inference_graph(other, steps, images) < digits.MAX_SERVING_GRAPH_ERROR / 10


def test_export_runs_no_batch_norm_arithmetic(trained):
    """The served graph has the folded layers only: no Rsqrt, Mul or Sub of a batch norm."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((trained.version_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}
    assert {"Conv2D", "Pad", "BiasAdd", "Relu", "Softmax"} <= ops
    assert not ops & {"Rsqrt", "Mul", "Sub", "FusedBatchNorm", "FusedBatchNormV3"}


def test_signature_matches_the_design(trained):
    show = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
                           "--dir", str(trained.version_dir), "--tag_set", "serve",
                           "--signature_def", "serving_default"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    text = " ".join(show.stdout.split())
    assert "inputs['image'] tensor_info: dtype: DT_FLOAT shape: (-1, 28, 28)" in text
    assert "outputs['probabilities'] tensor_info: dtype: DT_FLOAT shape: (-1, 10)" in text
    assert "outputs['digit'] tensor_info: dtype: DT_INT64 shape: (-1)" in text


def test_export_carries_tf_serving_warmup_records(trained):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = trained.version_dir / "assets.extra" / "tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(r)
               for r in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()]
    assert records
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "digits"
        assert tf.make_ndarray(request.inputs["image"]).shape[1:] == (28, 28)


def test_worse_model_is_not_blessed_and_nothing_is_pushed(trained, tmp_path):
    base = copy_model_base(trained, tmp_path / "models")
    result = run_training("digits", "--profile", "quick", "--steps", "3", "--min-accuracy", "0",
                          "--data", "mnist-5k", "--model-base", str(base),
                          "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not pushed: test accuracy" in result.stdout
    assert "worse than the pushed version" in result.stdout
    assert sorted(p.name for p in (base / "digits").iterdir() if p.name.isdigit()) == ["1"]
    metrics = json.loads(next((tmp_path / "runs").glob("digits/*/metrics.json")).read_text())
    assert metrics["blessing"]["blessed"] is False and metrics["baseline_version"] == 1


def test_bless_applies_value_then_change_threshold():
    assert bless("acc", 0.95, None, threshold=0.97, max_regression=0.001).blessed is False
    assert bless("acc", 0.98, None, threshold=0.97, max_regression=0.001).blessed is True
    assert bless("acc", 0.980, 0.9815, threshold=0.97, max_regression=0.001).blessed is False
    assert bless("acc", 0.9806, 0.9815, threshold=0.97, max_regression=0.001).blessed is True
    # Losses: lower is better.
    assert bless("loss", 1.5, 1.4, threshold=1.65, max_regression=0.05,
                 higher_is_better=False).blessed is False


def test_bless_allows_exactly_the_change_threshold_and_never_a_nan():
    # 0.991 - 0.992 is -0.0010000000000000009 in floats: one digit in a thousand is allowed.
    assert bless("acc", 0.991, 0.992, threshold=0.97, max_regression=0.001).blessed is True
    nan = float("nan")
    assert bless("loss", nan, None, threshold=1.65, max_regression=0.02,
                 higher_is_better=False).blessed is False
    assert "diverged" in bless("loss", nan, 1.54, threshold=1.65, max_regression=0.02,
                               higher_is_better=False).reason


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    folders = [pipeline.make_run_dir(tmp_path, "digits") for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)


def test_steps_are_rounded_up_to_whole_evaluation_intervals(capsys):
    assert pipeline.whole_intervals("digits", 150, 100) == (200, 100)
    assert "training 200 steps" in capsys.readouterr().out
    assert pipeline.whole_intervals("digits", 300, 100) == (300, 100)
    assert pipeline.whole_intervals("digits", 40, 100) == (40, 40)


@pytest.mark.parametrize("steps", ["0", "-5", "x"])
def test_steps_below_one_are_a_usage_error(tmp_path, steps):
    result = run_training("digits", "--profile", "quick", "--steps", steps,
                          "--model-base", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "--steps" in result.stderr
    assert not (tmp_path / "r").exists()


def judge_by_accuracy(calls: list, on_first_call=None):
    """A judge as digits.run makes one: it loads each baseline version (real TensorFlow) and
    blesses the candidate against it."""
    images, labels = np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64)

    def judge(baseline_dir):
        calls.append(None if baseline_dir is None else int(baseline_dir.name))
        if on_first_call and len(calls) == 1:
            on_first_call()
        baseline = None if baseline_dir is None else digits.accuracy_of_export(baseline_dir, images, labels)
        return ({},
                bless("acc", 0.99, baseline, threshold=0.5, max_regression=0.001))
    return judge


def test_a_broken_newest_version_is_skipped_as_the_baseline(trained, tmp_path):
    """A version on disk that cannot load (model servers skip it) must not stop every later
    candidate from being judged and pushed: the newest version that loads is the baseline."""
    model_dir = copy_model_base(trained, tmp_path / "models") / "digits"
    (model_dir / "2").mkdir()
    (model_dir / "2" / "saved_model.pb").write_bytes(b"garbage")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls, metrics = [], {}
    code = pipeline.finish("digits", run_dir, trained.version_dir, model_dir, metrics,
                           judge_by_accuracy(calls), "test")
    assert code == pipeline.EXIT_PUSHED and calls == [1]
    assert metrics["baseline_version"] == 1 and metrics["baseline_skipped_versions"] == [2]
    assert metrics["pushed_version"] == 3 and pushed_versions(model_dir) == [1, 2, 3]


def test_a_baseline_that_loads_but_cannot_be_evaluated_fails_the_run(trained, tmp_path):
    """Only what a model server cannot load is skipped: an evaluation that fails for another
    reason must not let the candidate skip the comparison with the version serving."""
    model_dir = copy_model_base(trained, tmp_path / "models") / "digits"

    def judge(baseline_dir):
        raise MemoryError("evaluating the baseline ran out of memory")

    with pytest.raises(MemoryError):
        pipeline.finish("digits", tmp_path, trained.version_dir, model_dir, {}, judge, "test")
    assert pushed_versions(model_dir) == [1]


def test_a_version_pushed_while_the_candidate_is_judged_makes_it_judge_again(trained, tmp_path):
    """Another trainer pushes version 2 after this one has judged its candidate against
    version 1: the push is refused and the candidate is judged against version 2 first."""
    model_dir = copy_model_base(trained, tmp_path / "models") / "digits"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls, metrics = [], {}
    judge = judge_by_accuracy(calls, on_first_call=lambda: push_version(trained.version_dir, model_dir))
    code = pipeline.finish("digits", run_dir, trained.version_dir, model_dir, metrics, judge, "test")
    assert code == pipeline.EXIT_PUSHED and calls == [1, 2]
    assert metrics["baseline_version"] == 2 and metrics["pushed_version"] == 3


def test_a_data_file_that_is_not_mnist_is_a_clear_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    result = run_training("digits", "--profile", "quick", "--data", str(tmp_path / "x.npy"),
                          "--model-base", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "not an mnist.npz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # no empty run folder either


def test_a_corpus_too_short_for_one_validation_sequence_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(SONNETS.read_text()[:1006])
    result = run_training("bard", "--profile", "cpu", "--steps", "2", "--corpus", str(short),
                          "--model-base", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "validation sequence" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_data_path_is_a_clear_error(tmp_path):
    result = run_training("digits", "--profile", "quick", "--data", str(tmp_path / "nope.npz"),
                          "--model-base", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"))
    assert result.returncode != 0
    assert "no such file" in result.stderr
    assert not (tmp_path / "m" / "digits").exists()


def test_the_blessing_threshold_follows_the_data(tmp_path):
    """Full MNIST's official 10,000 test digits and the 1,000 held out of the 5,000 shipped ones
    cannot share one number: the same profile blesses at 95% on the one, 90% on the other. A
    folder of IDX files counts as full MNIST. Trained without augmentation and with a seed of its
    own, which metrics.json records."""
    from test_mnist_data import small_mnist

    folder = tmp_path / "idx"
    folder.mkdir()
    for name, data in small_mnist().items():  # random images: nothing to learn
        (folder / name).write_bytes(data)
    for data, threshold in ((str(folder), "0.9500"), ("mnist-5k", "0.9000")):
        runs = tmp_path / f"runs-{threshold}"
        result = run_training("digits", "--profile", "quick", "--steps", "2", "--no-augment", "--seed", "7",
                              "--data", data, "--model-base", str(tmp_path / "models"),
                              "--runs-dir", str(runs))
        assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"is below the threshold {threshold}" in result.stdout
        metrics = json.loads(next(runs.glob("digits/*/metrics.json")).read_text())
        assert metrics["settings"]["augmented"] is False and metrics["settings"]["seed"] == 7
    assert not (tmp_path / "models" / "digits").exists()


@pytest.mark.parametrize("profile", ["cpu", "best"])
def test_the_cosine_profiles_warm_up_then_anneal_to_their_floor(profile):
    """The cpu and best profiles' schedule: a linear warmup to lr_max, then half a cosine down
    to LR_MIN_COSINE at the last step, where the talk's decay would still be high."""
    settings = digits.PROFILES[profile]
    rate = digits.learning_rate(settings)
    top, warmup, steps = settings["lr_max"], settings["warmup_steps"], settings["steps"]
    assert float(rate(0)) == pytest.approx(top / warmup, rel=1e-4)
    assert float(rate(warmup)) == pytest.approx(top, rel=1e-4)
    halfway = warmup + (steps - warmup) // 2
    assert float(rate(halfway)) == pytest.approx((top + digits.LR_MIN_COSINE) / 2, rel=1e-3)
    assert float(rate(steps)) == pytest.approx(digits.LR_MIN_COSINE, rel=1e-3)


def test_the_gpu_profile_is_the_talk_s_recipe():
    """Batch 100, 10,000 steps, lr = 0.0001 + 0.02 * exp(-step / 1600)."""
    settings = digits.PROFILES["gpu"]
    assert (settings["batch"], settings["steps"]) == (100, 10_000)
    rate = digits.learning_rate(settings)
    for step in (0, 1600, 10_000):
        assert float(rate(step)) == pytest.approx(0.0001 + 0.02 * np.exp(-step / 1600), rel=1e-5)
    assert digits.DROPOUT == 0.25
