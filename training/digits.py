"""Martin Görner's batch-normalised CNN for MNIST, trained, evaluated, blessed and pushed.

conv 6x6/1 -> 24, conv 5x5/2 -> 48, conv 4x4/2 -> 64, dense 200, softmax 10; batch norm
before every ReLU (offset, no scale, so the convolutions have no bias); dropout 0.25 on the
dense layer; Adam with lr = 0.0001 + 0.02 * exp(-step / 1600). Augmented with shifts,
rotations, scale and stroke thickness so that drawn digits look like training data.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from training import pipeline
from training.mnist_data import load_digits

NAME = "digits"
PROFILES = {
    # steps of `batch` images; the learning rate decays from lr_max to lr_min over decay_steps.
    "quick": dict(steps=200, batch=100, decay_steps=60, eval_every=100, min_accuracy=0.90),
    "cpu": dict(steps=1200, batch=100, decay_steps=400, eval_every=200, min_accuracy=0.97),
    "gpu": dict(steps=10_000, batch=100, decay_steps=1600, eval_every=500, min_accuracy=0.99),
}
LR_MAX, LR_MIN = 0.02, 0.0001
DROPOUT = 0.25
MAX_REGRESSION = 0.001  # a new version may be at most 0.1 point worse than the pushed one
SEED = 42


def build_model():
    import keras
    from keras import layers

    def conv_bn_relu(x, filters, size, stride):
        x = layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(scale=False)(x)
        return layers.ReLU()(x)

    image = keras.Input((28, 28), name="image")
    x = layers.Reshape((28, 28, 1))(image)
    x = conv_bn_relu(x, 24, 6, 1)
    x = conv_bn_relu(x, 48, 5, 2)
    x = conv_bn_relu(x, 64, 4, 2)
    x = layers.Flatten()(x)
    x = layers.Dense(200, use_bias=False)(x)
    x = layers.ReLU()(layers.BatchNormalization(scale=False)(x))
    x = layers.Dropout(DROPOUT)(x)
    probabilities = layers.Dense(10, activation="softmax")(x)
    return keras.Model(image, probabilities, name="goerner_batchnorm_cnn")


def learning_rate(decay_steps: int):
    import keras
    import tensorflow as tf

    class GoernerDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return LR_MIN + LR_MAX * tf.exp(-tf.cast(step, tf.float32) / decay_steps)

        def get_config(self):
            return {"decay_steps": decay_steps}

    return GoernerDecay()


def augment(images, seed: int):
    """Random shifts, rotations, scale and stroke thickness, on batches [b, 28, 28]."""
    import keras
    import tensorflow as tf
    from keras import layers

    geometry = keras.Sequential([
        layers.RandomRotation(12 / 360, fill_mode="constant", seed=seed),
        layers.RandomZoom(0.12, fill_mode="constant", seed=seed + 1),
        layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 2),
    ])

    def apply(x, y):
        x = geometry(x[..., None], training=True)
        thicker = tf.nn.max_pool2d(x, 2, 1, "SAME")
        thinner = -tf.nn.max_pool2d(-x, 2, 1, "SAME")
        choice = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], 0, 4, dtype=tf.int32)
        x = tf.where(choice == 0, thicker, tf.where(choice == 1, thinner, x))
        return tf.clip_by_value(x[..., 0], 0.0, 1.0), y

    return images.map(apply, num_parallel_calls=tf.data.AUTOTUNE)


def export(model, export_dir: Path) -> None:
    """SavedModel with serving_default: image [b, 28, 28] -> probabilities [b, 10], digit [b]."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="image")])
    def serve(image):
        probabilities = model(image, training=False)
        return {"probabilities": probabilities,
                "digit": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

    archive.add_endpoint("serving_default", serve)
    archive.write_out(str(export_dir), verbose=False)
    rng = np.random.default_rng(0)
    pipeline.write_warmup_requests(export_dir, NAME, [
        {"image": rng.random((1, 28, 28), dtype=np.float32)},
        {"image": rng.random((16, 28, 28), dtype=np.float32)},
    ])


def accuracy_of_export(export_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a SavedModel's serving_default signature: what a model server would answer."""
    import tensorflow as tf

    predict = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    digits = np.concatenate([predict(image=tf.constant(x[i:i + 500]))["digit"].numpy()
                             for i in range(0, len(x), 500)])
    return float(np.mean(digits == y))


def plot_curves(history: dict, steps_per_point: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(i + 1) * steps_per_point for i in range(len(history["loss"]))]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    acc.plot(steps, history["accuracy"], label="train")
    acc.plot(steps, history["val_accuracy"], label="validation")
    lowest = min(history["accuracy"] + history["val_accuracy"])
    acc.set(title="accuracy", xlabel="step", ylim=(max(0.0, lowest - 0.01), 1))
    loss.plot(steps, history["loss"], label="train")
    loss.plot(steps, history["val_loss"], label="validation")
    loss.set(title="cross-entropy loss", xlabel="step", yscale="log")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(profile: str, data: str, model_base: Path, runs_dir: Path, steps: int | None = None,
        min_accuracy: float | None = None) -> int:
    """Train, export, verify, evaluate, bless, push. Returns the process exit status."""
    import keras
    import tensorflow as tf

    from training.clock import TestAccuracyCurve, TrainingClock

    settings = dict(PROFILES[profile])
    if steps is not None:
        settings["steps"] = steps
        settings["eval_every"] = min(settings["eval_every"], steps)
    threshold = settings["min_accuracy"] if min_accuracy is None else min_accuracy
    run_dir = runs_dir / NAME / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(SEED)
    # Same data, profile and seed: the same weights. Without this, the order in which CPU threads
    # add up gradients varies from run to run, and so do the trained versions.
    tf.config.experimental.enable_op_determinism()

    splits = load_digits(data)
    print(f"{NAME}: profile {profile}, {splits.describe()}, run folder {run_dir}", flush=True)
    train = (tf.data.Dataset.from_tensor_slices((splits.x_train, splits.y_train))
             .shuffle(len(splits.x_train), seed=SEED).repeat().batch(settings["batch"]))
    train = augment(train, SEED).prefetch(tf.data.AUTOTUNE)

    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(settings["decay_steps"])),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock, curve = TrainingClock(), TestAccuracyCurve(splits.x_test, splits.y_test, settings["eval_every"])
    history = model.fit(
        train, steps_per_epoch=settings["eval_every"],
        epochs=max(1, settings["steps"] // settings["eval_every"]),
        validation_data=(splits.x_val, splits.y_val), shuffle=False, verbose=1 if sys.stdout.isatty() else 2,
        callbacks=[clock, keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")), curve])
    for point, seconds in zip(curve.points, clock.at_epoch_end, strict=True):
        point["train_seconds"] = seconds
    plot_curves(history.history, settings["eval_every"], run_dir / "curves.png")

    export_dir = run_dir / "export"
    export(model, export_dir)
    pipeline.verify_export(export_dir, {"image": splits.x_test[:2]},
                           ["probabilities", "digit"])
    test_accuracy = accuracy_of_export(export_dir, splits.x_test, splits.y_test)
    baseline_dir = pipeline.baseline_path(model_base / NAME)
    baseline = (None if baseline_dir is None
                else accuracy_of_export(baseline_dir, splits.x_test, splits.y_test))
    blessing = pipeline.bless("test accuracy", test_accuracy, baseline, threshold=threshold,
                              max_regression=MAX_REGRESSION)
    metrics = {
        "model": NAME, "profile": profile, "settings": settings, "data": splits.source,
        "train_examples": len(splits.x_train), "test_examples": len(splits.x_test),
        "train_seconds": round(clock.seconds, 1),  # training steps only, validation excluded
        "images_per_second": round(settings["steps"] * settings["batch"] / clock.seconds, 1),
        # Recorded after each interval for time-to-accuracy figures; nothing in training reads it.
        "test_accuracy_curve": curve.points,
        "validation_accuracy": history.history["val_accuracy"][-1],
        "test_accuracy": test_accuracy, "baseline_test_accuracy": baseline,
        "baseline_version": None if baseline_dir is None else int(baseline_dir.name),
        "history": history.history,
    }
    describe = f"test accuracy {test_accuracy:.2%} on {len(splits.x_test)} {splits.source} digits"
    return pipeline.finish(NAME, run_dir, export_dir, model_base / NAME, metrics, blessing, describe)
