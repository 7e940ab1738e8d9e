"""Martin Görner's batch-normalised CNN for MNIST, trained, evaluated, blessed and pushed.

conv 6x6/1 -> 24, conv 5x5/2 -> 48, conv 4x4/2 -> 64, dense 200, softmax 10; batch norm
before every ReLU (offset, no scale, so the convolutions have no bias); dropout 0.25 on the
dense layer; Adam. Augmented with shifts, rotations, scale and stroke thickness so that drawn
digits look like training data (--no-augment trains on MNIST as it is, as the talk did).

Profiles (every figure on the official 10,000 MNIST test digits is in docs/benchmarks.md):
  gpu:   the talk's recipe: batch 100, 10,000 steps, lr = 0.0001 + 0.02 * exp(-step / 1600).
  cpu:   3,000 steps with a schedule made for the short run (a 100-step warmup to 0.01, then
         half a cosine down to 0.00005): the talk's curve is still high on its learning rate
         at step 3,000, this one ends annealed. What `make run` trains.
  best:  the cpu schedule stretched over 15,000 steps, the last 3,000 on the digits as they are
         (no augmentation): beyond the talk's 99.58%.
  quick: 200 steps, for the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import distribute, ladder, pipeline
from training.mnist_data import load_digits

NAME = "digits"
PROFILES = {
    # steps of `batch` images. schedule "talk": lr = LR_MIN + lr_max * exp(-step / decay_steps);
    # "cosine": warmup_steps rising linearly to lr_max, then half a cosine down to LR_MIN_COSINE.
    # clean_share: the last fifth of an augmented run sees the digits as they are.
    # min_accuracy: the blessing's value threshold on the test split, by data (full MNIST's
    # official 10,000 digits, or the 1,000 held out of the 5,000 shipped ones): a floor that
    # stops a broken run, below what the profile reaches.
    "quick": dict(steps=200, batch=100, schedule="talk", lr_max=0.02, decay_steps=60, eval_every=100,
                  min_accuracy={"mnist": 0.95, "mnist-5k": 0.90}),
    "cpu": dict(steps=3000, batch=100, schedule="cosine", lr_max=0.01, warmup_steps=100, eval_every=500,
                min_accuracy={"mnist": 0.99, "mnist-5k": 0.97}),
    "gpu": dict(steps=10_000, batch=100, schedule="talk", lr_max=0.02, decay_steps=1600, eval_every=500,
                min_accuracy={"mnist": 0.99, "mnist-5k": 0.98}),
    "best": dict(steps=15_000, batch=100, schedule="cosine", lr_max=0.01, warmup_steps=100,
                 clean_share=0.2, eval_every=1500, min_accuracy={"mnist": 0.995, "mnist-5k": 0.98}),
}
LR_MIN = 0.0001  # the talk's floor
LR_MIN_COSINE = 0.00005
DROPOUT = 0.25
MAX_REGRESSION = 0.001  # a new version may be at most 0.1 point worse than the pushed one
SEED = 42  # the default: the weights, the order of the digits and the augmentation's draws
CLASSES = [str(digit) for digit in range(10)]  # the labels of the classification signature
MAX_SERVING_GRAPH_ERROR = 1e-5  # relative; see check_inference_graph


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


def learning_rate(settings: dict):
    """The profile's learning rate schedule (see PROFILES)."""
    import keras
    import tensorflow as tf

    class TalkDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return LR_MIN + settings["lr_max"] * tf.exp(-tf.cast(step, tf.float32) / settings["decay_steps"])

        def get_config(self):
            return {"lr_max": settings["lr_max"], "decay_steps": settings["decay_steps"]}

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            warmup, total, top = settings["warmup_steps"], settings["steps"], settings["lr_max"]
            progress = tf.clip_by_value((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
            cosine = LR_MIN_COSINE + (top - LR_MIN_COSINE) * 0.5 * (1.0 + tf.cos(np.pi * progress))
            return tf.where(step < warmup, top * (step + 1) / max(warmup, 1), cosine)

        def get_config(self):
            return {key: settings[key] for key in ("lr_max", "warmup_steps", "steps")}

    if settings["schedule"] == "constant":  # the talk's softmax: plain gradient descent
        return settings["lr_max"]
    return {"talk": TalkDecay, "cosine": WarmupCosine}[settings["schedule"]]()


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

    # Sequential: the run enables op determinism, under which TensorFlow 2.19 rewrites a parallel
    # map into a sequential one anyway, and logs an error-level line about an attribute the
    # rewritten op does not know (use_unbounded_threadpool). Keras slices numpy arrays with such a
    # map too: what it is given here are Datasets (pipeline.batches).
    return images.map(apply)


def inference_graph(model):
    """`model`'s forward pass for serving, with less work per image: its steps, one per layer
    or folded pair of layers (the last is the model's own last layer), and the variables it adds.

    Each batch norm is folded into the layer before it (kernel times gamma / sqrt(var + eps) per
    output channel, and an offset), so that Grappler fuses every layer into one op with its bias and
    ReLU (_FusedConv2D, _FusedMatMul) instead of running the norm's four ops. "same" padding
    becomes an explicit pad and a "valid" convolution: TensorFlow's CPU convolution with the
    6x6 kernel's uneven padding is slower. Together they save CPU per image
    (docs/benchmarks.md). The folded weights are computed once, here, and saved with the export."""
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    steps, variables, i = [], [], 0
    while i < len(layers):
        layer = layers[i]
        norm = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and isinstance(
                norm, keras.layers.BatchNormalization):
            if layer.activation is not keras.activations.linear:
                raise ValueError(f"cannot fold {norm.name}: {layer.name} has an activation")
            # norm(x W + b) = x (W s) + (b - mean) s + beta, with s = gamma / sqrt(var + eps)
            scale = (norm.gamma.numpy() if norm.scale else 1.0) / np.sqrt(
                norm.moving_variance.numpy() + norm.epsilon)
            offset = ((layer.bias.numpy() if layer.use_bias else 0.0) - norm.moving_mean.numpy()) * scale
            kernel = keras.Variable(layer.kernel.numpy() * scale, trainable=False,
                                    name=f"{layer.name}_folded")
            bias = keras.Variable(offset + (norm.beta.numpy() if norm.center else 0.0), trainable=False,
                                  name=f"{norm.name}_offset")
            variables += [kernel, bias]
            if isinstance(layer, keras.layers.Conv2D):
                if (layer.padding != "same" or layer.data_format != "channels_last"
                        or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1):
                    raise ValueError(f"{layer.name}: only plain channels-last 'same' convolutions are folded")
                pads = [[0, 0], *(same_padding(size, k, stride) for size, k, stride in zip(
                    layer.input.shape[1:3], layer.kernel_size, layer.strides, strict=True)), [0, 0]]
                steps.append(lambda x, kernel=kernel, bias=bias, strides=layer.strides, pads=pads:
                             tf.nn.bias_add(tf.nn.conv2d(tf.pad(x, pads), kernel, strides, "VALID"), bias))
            else:
                steps.append(lambda x, kernel=kernel, bias=bias: tf.nn.bias_add(tf.matmul(x, kernel), bias))
            i += 2
            continue
        if isinstance(layer, (keras.layers.Reshape, keras.layers.ReLU, keras.layers.Flatten,
                              keras.layers.Dense, keras.layers.Conv2D)):
            steps.append(layer)  # as Keras computes them; the last Dense keeps its bias and softmax
        elif not isinstance(layer, keras.layers.Dropout):  # dropout does nothing when serving
            raise ValueError(f"no inference form for layer {layer.name} ({type(layer).__name__})")
        i += 1
    return steps, variables


def same_padding(size: int, kernel: int, stride: int) -> list[int]:
    """TensorFlow's "same" padding of one dimension, as [before, after]."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return [total // 2, total - total // 2]


def run_steps(steps, x):
    for step in steps:
        x = step(x)
    return x


def check_inference_graph(model, steps, images: np.ndarray) -> float:
    """The largest difference between what the serving graph and the Keras model compute from
    `images` for the model's last layer to read, relative to its largest value. Compared before
    the softmax, which saturates and would hide a difference."""
    import keras
    import tensorflow as tf

    if steps[-1] is not model.layers[-1]:
        raise ValueError("the serving graph must end with the model's own last layer")
    want = keras.Model(model.input, model.layers[-1].input)(images, training=False).numpy()
    got = run_steps(steps[:-1], tf.constant(images)).numpy()
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def export(model, export_dir: Path, check_images: np.ndarray, name: str = NAME) -> None:
    """SavedModel with serving_default: image [b, 28, 28] -> probabilities [b, 10], digit [b],
    and classification (TF Serving's Classify and :classify): serialized tf.Examples -> classes
    and scores. The serving graph is checked against the Keras model on `check_images` first."""
    import keras
    import tensorflow as tf

    steps, variables = inference_graph(model)
    error = check_inference_graph(model, steps, check_images)
    if error > MAX_SERVING_GRAPH_ERROR:
        raise AssertionError(f"the serving graph differs from the Keras model by {error:.2e} (relative)")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_variable_collection("serving_variables", variables)

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="image")])
    def serve(image):
        probabilities = run_steps(steps, image)
        return {"probabilities": probabilities,
                "digit": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        """TF Serving's Classify: serialized tf.Examples, each with its 784 pixels as the float
        feature `image` (MNIST's convention) -> the ten classes "0".."9" and their scores."""
        pixels = tf.io.parse_example(inputs, {"image": tf.io.FixedLenFeature([28 * 28], tf.float32)})
        scores = run_steps(steps, tf.reshape(pixels["image"], [-1, 28, 28]))
        return {"classes": tf.broadcast_to(tf.constant(CLASSES), tf.shape(scores)), "scores": scores}

    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("classification", classify)
    archive.write_out(str(export_dir), verbose=False)
    pipeline.set_method_name(export_dir, "classification", "tensorflow/serving/classify")
    rng = np.random.default_rng(0)
    pipeline.write_warmup_requests(export_dir, name, [
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


def profile_settings(profile: str, steps: int | None, augmented: bool | None, seed: int,
                     rung: str = ladder.BN) -> dict:
    """The settings of a rung of the ladder (ladder.py; bn: this module's PROFILES) for the profile,
    with the run's own steps, augmentation (default: bn augments, the talk's lower rungs do not)
    and seed, and the model it trains."""
    recipe = PROFILES[profile] if rung == ladder.BN else ladder.recipe(rung, profile)
    augmented = (rung == ladder.BN) if augmented is None else augmented
    settings = dict(recipe, augmented=augmented, seed=seed, rung=rung, model=ladder.model_name(rung))
    if steps is not None:
        settings["steps"], settings["eval_every"] = pipeline.whole_intervals(
            settings["model"], steps, settings["eval_every"])
        settings["warmup_steps"] = min(settings.get("warmup_steps", 0), settings["steps"] // 10)
    return settings


def training_batches(splits, settings: dict):
    """The training digits, shuffled and batched for ever; augmented unless the settings say no,
    the last `clean_share` of the steps as they are."""
    import tensorflow as tf

    seed = settings["seed"]
    as_they_are = (tf.data.Dataset.from_tensor_slices((splits.x_train, splits.y_train))
                   .shuffle(len(splits.x_train), seed=seed).repeat().batch(settings["batch"]))
    train = augment(as_they_are, seed) if settings["augmented"] else as_they_are
    if settings["augmented"] and settings.get("clean_share"):
        train = train.take(round(settings["steps"] * (1 - settings["clean_share"]))).concatenate(as_they_are)
    return train.prefetch(tf.data.AUTOTUNE)


def network(rung: str):
    """A new Keras network of the rung: this module's batch-norm CNN, or a lower rung's."""
    return build_model() if rung == ladder.BN else ladder.build(rung)


def fit(settings: dict, splits, run_dir: Path, placement):
    """Build the network under the placement's strategy and train it: (model, history, clock, test
    accuracy curve). The curve is the chief's alone: it reads the weights, it runs no collective."""
    import keras

    from training.clock import TestAccuracyCurve, TrainingClock

    with placement.strategy.scope():
        model = network(settings["rung"])
        optimizer = {"adam": keras.optimizers.Adam,
                     "sgd": keras.optimizers.SGD}[settings.get("optimizer", "adam")]
        model.compile(optimizer=optimizer(learning_rate(settings)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock = TrainingClock(settings["model"], settings["eval_every"])
    curve = TestAccuracyCurve(splits.x_test, splits.y_test, settings["eval_every"])
    history = placement.fit(
        model, training_batches(splits, settings), pipeline.batches(splits.x_val, splits.y_val),
        settings["eval_every"], settings["steps"] // settings["eval_every"],
        [clock, keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")),
         *([curve] if placement.cluster.is_chief else [])],
        settings["batch"], keras.losses.SparseCategoricalCrossentropy(reduction=None), accuracy=True)
    return model, history, clock, curve


def run(profile: str, data: str, model_base: Path, runs_dir: Path, steps: int | None = None,
        min_accuracy: float | None = None, augmented: bool | None = None, seed: int = SEED,
        devices: int | None = None, rung: str = ladder.BN) -> int:
    """Train `rung` of the ladder (default the batch-norm CNN), export, verify, evaluate, bless,
    push. Returns the process exit status."""
    import keras
    import tensorflow as tf

    placement = distribute.place(devices)
    settings = profile_settings(profile, steps, augmented, seed, rung)
    name = settings["model"]
    splits = load_digits(data)
    threshold = settings["min_accuracy"][splits.kind] if min_accuracy is None else min_accuracy
    run_dir = placement.run_dir(runs_dir, name)
    keras.utils.set_random_seed(seed)
    # Same data, profile and seed: the same weights. Without this, the order in which CPU threads
    # add up gradients varies from run to run, and so do the trained versions.
    tf.config.experimental.enable_op_determinism()

    print(f"{name}: profile {profile}{'' if settings['augmented'] else ' without augmentation'}, "
          f"{splits.describe()}, {placement.how}, run folder {run_dir}", flush=True)
    model, history, clock, curve = fit(settings, splits, run_dir, placement)
    if not placement.cluster.is_chief:
        return placement.worker_done(name)
    with placement.chief(name) as outcome:
        for point, seconds in zip(curve.points, clock.at_epoch_end, strict=True):
            point["train_seconds"] = seconds
        plot_curves(history.history, settings["eval_every"], run_dir / "curves.png")

        export_dir = run_dir / "export"
        export(placement.plain(model, lambda: network(rung)), export_dir, splits.x_val[:64], name)
        pipeline.verify_export(export_dir, {"image": splits.x_test[:2]},
                               ["probabilities", "digit"])
        pipeline.verify_export(export_dir, {}, ["classes", "scores"], "classification",
                               f"inputs=[{{'image':{splits.x_test[0].ravel().round(4).tolist()}}}]")
        test_accuracy = accuracy_of_export(export_dir, splits.x_test, splits.y_test)

        def judge(baseline_dir: Path | None) -> tuple[dict, pipeline.Blessing]:
            baseline = (None if baseline_dir is None
                        else accuracy_of_export(baseline_dir, splits.x_test, splits.y_test))
            return ({"baseline_test_accuracy": baseline},
                    pipeline.bless("test accuracy", test_accuracy, baseline, threshold=threshold,
                                   max_regression=MAX_REGRESSION))

        metrics = {
            "model": name, "profile": profile, "settings": settings, "data": splits.source,
            "distribution": placement.how,
            "train_examples": len(splits.x_train), "test_examples": len(splits.x_test),
            "train_seconds": round(clock.seconds, 1),  # training steps only, validation excluded
            "images_per_second": round(settings["steps"] * settings["batch"] / clock.seconds, 1),
            # Recorded after each interval for time-to-accuracy figures; nothing in training reads it.
            "test_accuracy_curve": curve.points,
            "validation_accuracy": history.history["val_accuracy"][-1],
            "test_accuracy": test_accuracy, "history": history.history,
        }
        describe = f"test accuracy {test_accuracy:.2%} on {len(splits.x_test)} {splits.source} digits"
        outcome.code = pipeline.finish(name, run_dir, export_dir, model_base / name, metrics, judge, describe)
    return outcome.code
