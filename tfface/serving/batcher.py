"""Request batching, as TF Serving's batching does it.

Merging concurrent Predict requests into one model call is where the local
server's throughput comes from, and where threads, queues and deadlines
meet. On its own it can be read, and tested with a plain function standing
in for the model, without a gRPC server or a SavedModel.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional

import grpc
import numpy as np

from tfface.serving.errors import RequestError, tf_error_to_request_error
from tfface.serving.servables import call_naming_bad_images, Signature

# Model calls whose batch sizes a batcher remembers: enough for a benchmark
# run (about 20,000 calls), bounded for a server that runs for months.
MAX_BATCH_SIZES_KEPT = 100_000


class _Task:
    __slots__ = ("arrays", "size", "event", "result", "error", "cancelled")

    def __init__(self, arrays: dict, size: int):
        self.arrays = arrays
        self.size = size
        self.event = threading.Event()
        self.result = None
        self.error = None
        self.cancelled = False


class Batcher:
    """Merges queued requests for one signature into batched model calls."""

    def __init__(self, signature: Signature, max_batch_size: int, timeout_s: float, label: str):
        self._signature = signature
        self._max_batch_size = max_batch_size
        self._timeout_s = timeout_s
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._running = []  # the tasks of the model call in progress
        # Rows of the last MAX_BATCH_SIZES_KEPT model calls, for tests and benchmarks.
        self.batch_sizes = collections.deque(maxlen=MAX_BATCH_SIZES_KEPT)
        self._thread = threading.Thread(target=self._loop, name=label, daemon=True)
        self._thread.start()

    def submit(self, arrays: dict, size: int, timeout_s: Optional[float]) -> dict:
        task = _Task(arrays, size)
        with self._cond:
            if self._stopped:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self._queue.append(task)
            self._cond.notify_all()
        if not task.event.wait(timeout_s):
            task.cancelled = True
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for a batch")
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fails what is queued or running (their RPCs are over by now) so no
        handler thread waits for a model call, then joins the thread for at
        most `timeout_s` (it is a daemon: a long call cannot hold the exit)."""
        with self._cond:
            self._stopped = True
            waiting = list(self._queue) + list(self._running)
            self._queue.clear()
            self._cond.notify_all()
        for task in waiting:
            if not task.event.is_set():
                task.error = RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                task.event.set()
        self._thread.join(timeout_s)

    def _next_batch(self) -> Optional[list]:
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, total = [first], first.size
            deadline = time.monotonic() + self._timeout_s
            while total < self._max_batch_size:
                if self._queue:
                    if total + self._queue[0].size > self._max_batch_size:
                        break
                    task = self._queue.popleft()
                    batch.append(task)
                    total += task.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            self._running = batch  # under the lock: stop() sees every task taken
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [t for t in batch if not t.cancelled]
            try:
                self._execute(batch)
            except Exception as e:  # never let the batching thread die
                for task in batch:
                    if not task.event.is_set():
                        task.error = tf_error_to_request_error(e)
                        task.event.set()

    def _execute(self, batch: list) -> None:
        if not batch:
            return
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        try:
            merged = {
                key: np.concatenate([t.arrays[key] for t in batch], axis=0) for key in batch[0].arrays
            }
            total = sum(t.size for t in batch)
            outputs = self._signature(merged)
            self.batch_sizes.append(total)
        except Exception:
            # Someone's input broke the merged call: rerun one by one so only
            # the culprit gets the error.
            for task in batch:
                self._run_alone(task)
            return
        offsets = np.cumsum([0] + [t.size for t in batch])
        for i, task in enumerate(batch):
            task.result = {
                key: value[offsets[i] : offsets[i + 1]]
                if value.ndim > 0 and value.shape[0] == total
                else value
                for key, value in outputs.items()
            }
            task.event.set()

    def _run_alone(self, task: _Task) -> None:
        try:
            task.result = call_naming_bad_images(self._signature, task.arrays)
            self.batch_sizes.append(task.size)
        except Exception as e:  # reported to the caller, never raised here
            task.error = tf_error_to_request_error(e)
        task.event.set()
