"""The talk's ladder: the networks of "TensorFlow and deep learning without a PhD" below the
batch-norm CNN, each with the talk's own recipe, on the same MNIST through the same pipeline.

- softmax: one dense layer of 10 with softmax; gradient descent, 0.005 on the batch's summed
  loss (0.5 on its mean), 2,000 steps. The talk: about 92%.
- dense: 5 dense layers, 200-100-60-30-10, ReLU; Adam, lr 0.0001 + 0.0029 e^(-step/2000),
  10,000 steps. 98.2%.
- conv: conv 5x5/1 -> 4, 5x5/2 -> 8, 4x4/2 -> 12 channels, dense 200, ReLU; as dense. 98.9%.
- conv-dropout: conv 6x6/1 -> 6, 5x5/2 -> 12, 4x4/2 -> 24, dense 200 with dropout 0.25 (the
  talk's pkeep 0.75); as dense. 99.3%.
- bn: training/digits.py's batch-norm CNN and its profiles. 99.5%.

All take batches of 100 digits, as the talk does, and train on the digits as they are (the talk did
not augment). Each rung is its own model: `digits-<rung>` in serving/models.config; bn is
`digits`, what the gateway reads by default.
"""

from __future__ import annotations

BN = "bn"
DEFAULT_MODEL = "digits"  # bn's model name
TALK_ACCURACY = {"softmax": 0.92, "dense": 0.982, "conv": 0.989, "conv-dropout": 0.993, BN: 0.995}
RUNGS = tuple(TALK_ACCURACY)  # from the bottom of the ladder to the top
LOWER_RUNGS = RUNGS[:-1]

# The talk's learning-rate curve for dense, conv and conv-dropout (digits.py's "talk" schedule:
# LR_MIN + lr_max * exp(-step / decay_steps)); min_accuracy: the blessing floor by data, a point
# or more below what the recipe reaches, to stop a broken run only.
ADAM_DECAY = dict(batch=100, schedule="talk", lr_max=0.0029, decay_steps=2000, optimizer="adam")
RECIPES = {
    "softmax": dict(steps=2000, batch=100, schedule="constant", lr_max=0.5, optimizer="sgd",
                    eval_every=500, min_accuracy={"mnist": 0.90, "mnist-5k": 0.85}),
    "dense": dict(ADAM_DECAY, steps=10_000, eval_every=1000, min_accuracy={"mnist": 0.97, "mnist-5k": 0.90}),
    "conv": dict(ADAM_DECAY, steps=10_000, eval_every=1000, min_accuracy={"mnist": 0.98, "mnist-5k": 0.93}),
    "conv-dropout": dict(ADAM_DECAY, steps=10_000, eval_every=1000,
                         min_accuracy={"mnist": 0.985, "mnist-5k": 0.94}),
}
# --profile quick (the tests): a few hundred steps, enough to prove the pipeline, not the recipe.
QUICK = dict(steps=200, eval_every=100, min_accuracy={"mnist": 0.70, "mnist-5k": 0.70})


def model_name(rung: str) -> str:
    """The served model of a rung: `digits` for bn, `digits-<rung>` for the others."""
    return DEFAULT_MODEL if rung == BN else f"{DEFAULT_MODEL}-{rung}"


def recipe(rung: str, profile: str) -> dict:
    """A lower rung's settings: the talk's recipe for every profile but quick."""
    settings = dict(RECIPES[rung])
    if profile == "quick":
        settings.update(QUICK)
    return settings


def build(rung: str):
    """A lower rung's Keras network: image [b, 28, 28] -> probabilities [b, 10]."""
    import keras
    from keras import layers

    image = keras.Input((28, 28), name="image")
    if rung in ("softmax", "dense"):
        x = layers.Flatten()(image)
        for units in ((200, 100, 60, 30) if rung == "dense" else ()):
            x = layers.Dense(units, activation="relu")(x)
    else:
        x = layers.Reshape((28, 28, 1))(image)
        shapes = {"conv": ((4, 5, 1), (8, 5, 2), (12, 4, 2)),
                  "conv-dropout": ((6, 6, 1), (12, 5, 2), (24, 4, 2))}[rung]
        for filters, size, stride in shapes:
            x = layers.Conv2D(filters, size, strides=stride, padding="same", activation="relu")(x)
        x = layers.Dense(200, activation="relu")(layers.Flatten()(x))
        if rung == "conv-dropout":
            x = layers.Dropout(0.25)(x)
    probabilities = layers.Dense(10, activation="softmax")(x)
    return keras.Model(image, probabilities, name=f"ladder_{rung.replace('-', '_')}")
