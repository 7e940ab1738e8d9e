"""Dynamic batching with TF Serving's parameters: concurrent requests share one model run.

Requests queue up; a batch thread takes the oldest and adds more until the batch holds
max_batch_size rows or the oldest has waited batch_timeout_micros, runs the model once on the
concatenated inputs and hands each request its rows of the outputs. When more than
max_enqueued_batches batches' worth of rows are waiting, new requests are refused with
UNAVAILABLE at once, as TF Serving does, instead of queueing without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

DEFAULTS = {"max_batch_size": 32, "batch_timeout_micros": 1000, "max_enqueued_batches": 100,
            "num_batch_threads": 2}


class QueueFull(Exception):
    """More work is waiting than max_enqueued_batches allows."""


@dataclass
class _Task:
    inputs: dict
    rows: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batches calls of `run(inputs) -> outputs` whose every input and output has rows on axis 0."""

    def __init__(self, run, parameters: dict, name: str = "batcher"):
        params = {**DEFAULTS, **{k: v for k, v in parameters.items() if k in DEFAULTS}}
        self.run = run
        self.max_batch_size = params["max_batch_size"]
        self.timeout = params["batch_timeout_micros"] / 1e6
        self.max_waiting_rows = params["max_enqueued_batches"] * self.max_batch_size
        self.allowed_sizes = sorted(parameters.get("allowed_batch_sizes", []))
        self.batches_run = 0  # how many model runs served how many requests: for tests and metrics
        self.requests_run = 0
        self._queue: deque[_Task] = deque()
        self._waiting_rows = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(params["num_batch_threads"])]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        if rows > self.max_batch_size or rows == 0:
            return self.run(inputs)  # too big to share a batch: run on its own
        task = _Task(inputs, rows)
        with self._cond:
            if self._stopped:  # an unloaded version finishing its last requests
                return self.run(inputs)
            if self._waiting_rows + rows > self.max_waiting_rows:
                raise QueueFull(f"the batching queue is full ({self._waiting_rows} rows waiting)")
            self._queue.append(task)
            self._waiting_rows += rows
            self._cond.notify()
        return task.future.result()

    def stop(self) -> None:
        """Stop after running what is already queued: no caller is left waiting."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take_batch(self) -> list[_Task]:
        with self._cond:
            while True:
                if self._stopped and not self._queue:
                    return []
                if self._queue:
                    rows = 0
                    for task in self._queue:
                        if rows + task.rows > self.max_batch_size:
                            break
                        rows += task.rows
                    deadline = self._queue[0].enqueued + self.timeout
                    full = rows >= self.max_batch_size or rows < sum(t.rows for t in self._queue)
                    if full or self._stopped or time.monotonic() >= deadline:
                        batch, taken = [], 0
                        while self._queue and taken + self._queue[0].rows <= self.max_batch_size:
                            task = self._queue.popleft()
                            batch.append(task)
                            taken += task.rows
                        self._waiting_rows -= taken
                        return batch
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                else:
                    self._cond.wait()

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            try:
                inputs = {key: np.concatenate([t.inputs[key] for t in batch]) for key in batch[0].inputs}
                total = sum(t.rows for t in batch)
                padded = next((size for size in self.allowed_sizes if size >= total), total)
                if padded > total:  # allowed_batch_sizes: pad with copies of the last row
                    inputs = {k: np.concatenate([v, np.repeat(v[-1:], padded - total, axis=0)])
                              for k, v in inputs.items()}
                outputs = self.run(inputs)
                self.batches_run += 1
                self.requests_run += len(batch)
                start = 0
                for task in batch:
                    task.future.set_result({k: v[start:start + task.rows] for k, v in outputs.items()})
                    start += task.rows
            except BaseException as error:  # every waiting caller gets the error, none hangs
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(error)
