"""Training-time bookkeeping for metrics.json: seconds spent training (validation excluded), and
the test accuracy after every evaluation interval, for throughput and time-to-accuracy figures."""

from __future__ import annotations

import time

import keras
import numpy as np


class TrainingClock(keras.callbacks.Callback):
    """Seconds spent in training steps only: the validation pass at each epoch end is not counted,
    so images or characters per second do not depend on how often or how much is validated.
    With `name`, it also prints after each epoch how far training is and about how long is left
    (from the wall time so far, validation included)."""

    def __init__(self, name: str = "", steps_per_epoch: int = 0):
        super().__init__()
        self.seconds, self.at_epoch_end, self._since = 0.0, [], None
        self.name, self.steps_per_epoch, self._started = name, steps_per_epoch, None

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._since = time.perf_counter()

    def _stop(self):
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()
        self.at_epoch_end.append(round(self.seconds, 2))
        epochs = self.params.get("epochs") or 0
        if self.name and self._started is not None and epochs:
            done, wall = epoch + 1, time.perf_counter() - self._started
            print(f"{self.name}: step {done * self.steps_per_epoch:,} of {epochs * self.steps_per_epoch:,} "
                  f"({done / epochs:.0%}) in {wall / 60:.1f} min, about "
                  f"{wall / done * (epochs - done) / 60:.1f} min left", flush=True)


class TestAccuracyCurve(keras.callbacks.Callback):
    """Test accuracy after every epoch (evaluation interval), for reporting time to an accuracy.
    Only recorded: nothing in training reads it (no early stopping, no model selection).

    It runs the model's forward pass on the weights as they are, not model.predict: under
    MultiWorkerMirroredStrategy, predict would split the digits over every worker and wait for
    them, and only the chief records the curve."""

    def __init__(self, x: np.ndarray, y: np.ndarray, steps_per_epoch: int):
        super().__init__()
        self.x, self.y, self.steps_per_epoch, self.points = x, y, steps_per_epoch, []
        self.forward = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        if self.forward is None:
            self.forward = tf.function(lambda images: tf.argmax(self.model(images, training=False), axis=1))
        digits = np.concatenate([self.forward(tf.constant(self.x[i:i + 500])).numpy()
                                 for i in range(0, len(self.x), 500)])
        accuracy = float(np.mean(digits == self.y))
        self.points.append({"step": (epoch + 1) * self.steps_per_epoch, "test_accuracy": accuracy})
