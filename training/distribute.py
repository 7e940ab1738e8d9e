"""Which tf.distribute strategy a training job runs under, and which worker is the chief.

- TF_CONFIG naming more than one task (chief and workers): MultiWorkerMirroredStrategy, one
  process per machine, gradients all-reduced every step. Every worker trains; the chief alone
  exports, verifies, blesses and pushes (a worker never writes a version).
- Otherwise several devices (--devices N, or every visible GPU when there are several):
  MirroredStrategy, one replica per device in this process.
- Otherwise the default strategy: one device, as before.

The global batch and the learning-rate schedule do not change with the number of replicas: each
step still takes `batch` examples (split over the replicas) and the talk's schedule, so a
distributed run trains the same recipe, faster.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from training.pipeline import EXIT_FAILED, make_run_dir

# How long the tasks wait for each other at the end, once the chief said how its run ended.
CHIEF_WAIT_MS = 10 * 60 * 1000


@dataclass(frozen=True)
class Cluster:
    """What TF_CONFIG says about this process: its task and the cluster's size."""

    task_type: str = "worker"
    task_index: int = 0
    tasks: int = 1  # chief and workers together
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster names no chief (TensorFlow's convention)."""
        return self.task_type == "chief" or (self.task_index == 0 and not self.has_chief)

    def describe(self) -> str:
        return f"{self.task_type} {self.task_index} of {self.tasks} tasks"


def cluster_from_env(environ=os.environ) -> Cluster:
    """TF_CONFIG, read as TensorFlow reads it; a missing one is a cluster of one."""
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return Cluster()
    try:
        config = json.loads(text)
        jobs = config["cluster"]
        task = config.get("task", {})
        tasks = sum(len(jobs.get(kind, [])) for kind in ("chief", "worker"))
        cluster = Cluster(task.get("type", "worker"), int(task.get("index", 0)), tasks, "chief" in jobs)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a valid cluster description ({error}): {text[:200]}") from None
    if cluster.task_type not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG: task type {cluster.task_type!r} is not chief or worker "
                         "(MultiWorkerMirroredStrategy has no parameter servers or evaluators)")
    return cluster


@dataclass
class Placement:
    """Where a training job runs: its cluster, its strategy, and what only the chief does."""

    cluster: Cluster
    strategy: object  # tf.distribute.Strategy
    how: str  # for the log
    scratch: Path | None = None  # a worker's run folder, removed when it is done

    def run_dir(self, runs_dir: Path, name: str) -> Path:
        """The chief's new runs/<name>/<time>/; a worker's logs go to a temporary folder."""
        if self.cluster.is_chief:
            return make_run_dir(runs_dir, name)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{name}-{self.cluster.task_type}-"))
        return self.scratch

    def fit(self, model, train, validation, steps_per_epoch: int, epochs: int, callbacks: list,
            batch: int, loss, accuracy: bool = False):
        """model.fit(train, ...) on one machine, under MirroredStrategy or none. Across several
        workers, fit_across_workers: Keras 3.15's fit fails there (keras-team/keras#20585: it
        reduces structures and scalars in ways MultiWorkerMirroredStrategy does not). `loss` is
        the compiled loss with reduction None, `batch` the global batch, `accuracy` whether accuracy
        is logged too."""
        if self.cluster.tasks == 1:
            return model.fit(self.shard(train), steps_per_epoch=steps_per_epoch, epochs=epochs,
                             validation_data=self.shard(validation), shuffle=False, verbose=2,
                             callbacks=callbacks)
        return fit_across_workers(model, self.strategy, self.shard(train), self.shard(validation),
                                  steps_per_epoch, epochs, callbacks, batch, loss, accuracy)

    def shard(self, dataset):
        """`dataset`, split by element over the workers (it is made in memory, not read from
        files, so TensorFlow's default file-based split would fall back with a warning)."""
        import tensorflow as tf

        if self.cluster.tasks == 1:
            return dataset
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def plain(self, model, build):
        """`model` itself under one device; else a copy outside the strategy (`build()` then its
        weights), so that the export is what a single-device run exports."""
        if self.strategy is default_strategy():
            return model
        copy = build()
        copy.set_weights(model.get_weights())
        return copy

    def worker_done(self, name: str) -> int:
        """A worker's end: it waits for the chief to export, verify, bless and push, and exits
        with the chief's exit status, so that a Job's workers all say how the run ended."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        print(f"{name}: {self.cluster.describe()} done training; waiting for the chief to export "
              "and push", flush=True)
        code = int(self._at_the_end(name, None))
        print(f"{name}: the chief finished with exit status {code}", flush=True)
        return code

    @contextmanager
    def chief(self, name: str):
        """The chief's work after training, as `with placement.chief(name) as outcome:` setting
        outcome.code. Its exit status reaches the workers whatever happens (a failure is
        EXIT_FAILED to them), then every task exits together (a task that leaves first reads to
        the others as a crash)."""
        outcome = SimpleNamespace(code=EXIT_FAILED)
        try:
            yield outcome
        finally:
            if self.cluster.tasks > 1:
                self._at_the_end(name, outcome.code)

    def _at_the_end(self, name: str, code: int | None) -> str:
        """The chief's exit status, through the coordination service's key-value store, and a
        barrier every task passes before it exits."""
        from tensorflow.python.eager import context

        key = f"scribe/{name}/exit_status"
        if code is not None:
            context.context().set_config_key_value(key, str(code))
        value = context.context().get_config_key_value(key)  # waits for the chief
        context.context().wait_at_barrier(f"scribe/{name}/done", CHIEF_WAIT_MS)
        return value


def default_strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


def place(devices: int | None = None, environ=os.environ) -> Placement:
    """This process's Placement, from TF_CONFIG and --devices. First thing in a job:
    MultiWorkerMirroredStrategy must exist before TensorFlow runs any op."""
    cluster = cluster_from_env(environ)
    strategy, how = strategy_for(cluster, devices)
    return Placement(cluster, strategy, how)


def strategy_for(cluster: Cluster, devices: int | None):
    """The strategy for this process (see the module's docstring), and its name for the log."""
    import tensorflow as tf

    if cluster.tasks > 1:
        if devices not in (None, 1):
            raise ValueError("--devices is for one machine; with TF_CONFIG each worker uses its devices")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy, f"MultiWorkerMirroredStrategy, {cluster.describe()}"
    gpus = tf.config.list_physical_devices("GPU")
    if devices is None:
        devices = len(gpus) if len(gpus) > 1 else 1
    if devices == 1:
        return default_strategy(), "one device"
    if gpus and len(gpus) < devices:
        raise ValueError(f"--devices {devices}: only {len(gpus)} GPUs are visible")
    if not gpus:  # trials and tests on a machine without GPUs: the CPU as several logical devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    names = [f"/{'gpu' if gpus else 'cpu'}:{i}" for i in range(devices)]
    return tf.distribute.MirroredStrategy(names), f"MirroredStrategy over {', '.join(names)}"


def fit_across_workers(model, strategy, train, validation, steps_per_epoch: int, epochs: int,
                       callbacks: list, global_batch: int, loss, accuracy: bool):
    """What model.fit does, as TensorFlow's custom training loop for MultiWorkerMirroredStrategy:
    each worker takes its share of every global batch, the optimizer all-reduces the gradients
    (Keras's optimizer sums them over replicas, so each replica's loss is scaled by the global
    batch), the logs are summed over the workers. Same callbacks and logs as fit: a History."""
    import keras
    import tensorflow as tf

    def totals(x, y, training: bool):
        """Per replica: (sum of per-example losses, correct predictions, examples)."""
        with tf.GradientTape() as tape:
            out = model(x, training=training)
            per_example = tf.reshape(loss(y, out), [tf.shape(x)[0], -1])
            per_example = tf.reduce_mean(per_example, axis=1)  # a sequence's mean per character
            scaled = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        if training:
            variables = model.trainable_variables
            model.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        correct = tf.constant(0.0)
        if accuracy:
            predicted = tf.cast(tf.argmax(out, axis=-1), y.dtype)
            correct = tf.reduce_sum(tf.cast(tf.equal(predicted, y), tf.float32))
        return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(x)[0], tf.float32)

    @tf.function
    def train_step(batches):
        x, y = next(batches)
        return strategy.reduce("SUM", strategy.run(totals, args=(x, y, True)), axis=None)

    @tf.function
    def eval_step(x, y):
        return strategy.reduce("SUM", strategy.run(totals, args=(x, y, False)), axis=None)

    batches = iter(strategy.experimental_distribute_dataset(train))
    held_out = strategy.experimental_distribute_dataset(validation)
    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=True, model=model,
                                                 verbose=2, epochs=epochs, steps=steps_per_epoch)
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        sums = tf.zeros(3)  # read once an epoch: steps stay asynchronous, as in fit
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            sums += tf.stack(train_step(batches))
            callback_list.on_train_batch_end(step)
        logs = _logs(sums.numpy(), accuracy)
        callback_list.on_test_begin()
        held = tf.zeros(3)
        for x, y in held_out:
            held += tf.stack(eval_step(x, y))
        validation_logs = _logs(held.numpy(), accuracy)
        callback_list.on_test_end(validation_logs)
        logs.update({f"val_{key}": value for key, value in validation_logs.items()})
        callback_list.on_epoch_end(epoch, logs)
    callback_list.on_train_end(logs)
    return model.history


def _logs(sums: np.ndarray, accuracy: bool) -> dict:
    loss_sum, correct, count = (float(v) for v in sums)
    logs = {"loss": loss_sum / max(count, 1)}
    if accuracy:
        logs["accuracy"] = correct / max(count, 1)
    return logs

