"""Dynamic batching with TF Serving's parameters: concurrent requests share one model run.

Requests queue up. At most num_batch_threads runs are in progress at once; when one may start,
the thread of the oldest waiting request runs it itself: it adds later requests until the batch
holds max_batch_size rows or the oldest has waited batch_timeout_micros, runs the model once on
the concatenated inputs, hands every request its rows of the outputs, and passes the turn to the
next waiting request. There are no batch threads to hand work to: such a hand-off (queue,
wake-up, future) costs a sizeable share of a small model's run in CPU. When more
than max_enqueued_batches batches' worth of rows are waiting, new requests are refused with
UNAVAILABLE at once, as TF Serving does, instead of queueing without bound.

Requests are batched only with others of the same key (the caller's, plus every input's shape
after the batch dimension and dtype, text of any length counting as one dtype), so one request's
odd shape never fails another's batch. The runs and the queue limit are shared by all keys, as a
TF Serving batch scheduler's threads are shared by its queues: requests of many different shapes
wait their turn like the rest instead of each key running num_batch_threads of its own. The
gateway uses the same batcher to coalesce digit requests into shared Predict calls
(serving/gateway/app.py), keyed by model pin.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

import numpy as np

DEFAULTS = {"max_batch_size": 32, "batch_timeout_micros": 1000, "max_enqueued_batches": 100,
            "num_batch_threads": 2}

Tensors = dict[str, np.ndarray]


def _dtype_key(value) -> str:
    """A dtype for batching keys: numpy gives text a dtype per length ('<U3', '<U5'), and prompts
    of different lengths still concatenate into one batch."""
    dtype = np.asarray(value).dtype
    return dtype.kind if dtype.kind in "USO" else dtype.str


class QueueFull(Exception):
    """More work is waiting than max_enqueued_batches allows."""


class _Request:
    __slots__ = ("inputs", "rows", "enqueued", "wake", "outputs", "error", "done")

    def __init__(self, inputs: Tensors, rows: int):
        self.inputs, self.rows = inputs, rows
        self.enqueued = time.monotonic()
        self.wake = threading.Lock()  # held until answered, or until it is this request's turn to run
        self.wake.acquire()
        self.outputs = self.error = None
        self.done = False


class DynamicBatcher:
    """Batches calls of `run(inputs, key) -> outputs` whose every input and output has rows on
    axis 0; each caller gets its own rows of every output, or the run's error."""

    def __init__(self, run: Callable[[Tensors, Hashable], Tensors], parameters: dict,
                 name: str = "batcher", on_batch: Callable[[int], None] | None = None):
        params = {**DEFAULTS, **{k: v for k, v in parameters.items() if k in DEFAULTS}}
        self.run, self.name, self.on_batch = run, name, on_batch  # on_batch(requests in the run)
        self.max_batch_size = params["max_batch_size"]
        self.timeout = params["batch_timeout_micros"] / 1e6
        self.max_runs = max(1, params["num_batch_threads"])
        self.max_waiting_rows = params["max_enqueued_batches"] * self.max_batch_size
        self.allowed_sizes = sorted(parameters.get("allowed_batch_sizes", []))
        self.batches_run = 0  # how many model runs served how many requests: for tests and metrics
        self.requests_run = 0
        self._lock = threading.Lock()
        self._company = threading.Condition(self._lock)  # a run waiting to fill its batch
        self._waiting: dict[Hashable, deque[_Request]] = {}  # only keys with requests waiting
        self._runs = 0  # runs in progress, of any key
        self._waiting_rows = 0
        self._stopped = False

    def submit(self, inputs: Tensors, key: Hashable = None) -> Tensors:
        rows = len(next(iter(inputs.values())))
        if rows > self.max_batch_size or rows == 0:
            return self.run(inputs, key)  # too big to share a batch: run on its own
        key = (key, tuple((name, np.shape(value)[1:], _dtype_key(value))
                          for name, value in sorted(inputs.items())))
        request = _Request(inputs, rows)
        with self._lock:
            if self._stopped:  # an unloaded version finishing its last requests
                lead = None
            elif self._runs < self.max_runs:
                # Requests wait only while every run is taken, so this one is the oldest: it runs now.
                self._runs += 1
                lead = True
            elif self._waiting_rows + rows > self.max_waiting_rows:
                raise QueueFull(f"the batching queue is full ({self._waiting_rows} rows waiting)")
            else:
                self._waiting.setdefault(key, deque()).append(request)
                self._waiting_rows += rows
                if self.timeout:
                    self._company.notify_all()  # a run waiting for company may have a full batch now
                lead = False
        if lead is None:
            return self.run(inputs, key[0])
        if not lead:
            request.wake.acquire()  # released once answered, or when it is this request's turn
        if not request.done:
            self._run_batch(key, request)
        if request.error is not None:
            raise request.error
        return request.outputs

    def stop(self) -> None:
        """Stop batching: runs waiting for company go at once, and later requests run on their
        own. Every request already queued is still run; no caller is left waiting."""
        with self._lock:
            self._stopped = True
            self._company.notify_all()

    def _queued_rows(self, key: Hashable) -> int:
        return sum(r.rows for r in self._waiting.get(key, ()))

    def _run_batch(self, key: Hashable, first: _Request) -> None:
        """Run `first` with the oldest waiting requests after it, answer them all, then hand the
        turn to the next waiting request (or free the run)."""
        batch, rows = [first], first.rows
        with self._lock:
            deadline = first.enqueued + self.timeout
            while (self.timeout and not self._stopped and rows + self._queued_rows(key) < self.max_batch_size
                   and (remaining := deadline - time.monotonic()) > 0):
                self._company.wait(remaining)
            waiting = self._waiting.get(key, ())
            while waiting and rows + waiting[0].rows <= self.max_batch_size:
                batch.append(waiting.popleft())
                rows += batch[-1].rows
                self._waiting_rows -= batch[-1].rows
            if key in self._waiting and not waiting:
                del self._waiting[key]
        try:
            inputs = first.inputs if len(batch) == 1 else {
                name: np.concatenate([r.inputs[name] for r in batch]) for name in first.inputs}
            padded = next((size for size in self.allowed_sizes if size >= rows), rows)
            if padded > rows:  # allowed_batch_sizes: pad with copies of the last row
                inputs = {k: np.concatenate([v, np.repeat(v[-1:], padded - rows, axis=0)])
                          for k, v in inputs.items()}
            outputs = self.run(inputs, key[0])
            if any(len(value) != padded for value in outputs.values()):
                raise ValueError(f"{self.name}: the run answered {[len(v) for v in outputs.values()]}"
                                 f" rows for {padded}")
            start = 0
            for request in batch:
                request.outputs = {k: v[start:start + request.rows] for k, v in outputs.items()}
                start += request.rows
        except BaseException as error:  # every caller of the batch gets the error; none hangs
            for request in batch:
                request.error = error
        with self._lock:
            self.batches_run += 1
            self.requests_run += len(batch)
            # The run passes to the oldest waiting request of any key, which runs its own key's batch.
            successor = None
            if self._waiting:
                oldest = min(self._waiting, key=lambda k: self._waiting[k][0].enqueued)
                successor = self._waiting[oldest].popleft()
                self._waiting_rows -= successor.rows
                if not self._waiting[oldest]:  # forget idle keys: callers' keys are not a fixed set
                    del self._waiting[oldest]
            else:
                self._runs -= 1
        for request in batch:
            request.done = True
            if request is not first:
                request.wake.release()
        if successor is not None:
            successor.wake.release()  # it runs the next batch
        if self.on_batch is not None:
            self.on_batch(len(batch))
