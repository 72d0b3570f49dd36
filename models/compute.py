"""Compute threads: where models do their heavy work (loading, warm-up, forward passes,
generation).

On the CPU, torch and llama.cpp run their parallel work on OpenMP (libgomp, one copy
shared by both in a worker process). libgomp gives every thread that starts parallel
work a team of threads of its own, and once the process holds more such threads than it
has CPUs it stops spinning at barriers and sleeps instead. Forward passes meet at a
barrier after every op, so that costs them 10-25% of their speed (measured on a 2-core
host: llama.cpp warmed up on one thread and run on another, ~20%; MiniLM likewise, ~25%;
two encoder models with a thread each, ~10% on rerank). So the encoder models of a worker share one compute thread (their forward passes
are short, and on one device they would contend anyway), and each generation model,
whose generations hold its thread for seconds, has its own.
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from wire.errors import InferenceError

T = TypeVar("T")


class ComputeThread:
    """One model's (or the encoders') thread. It keeps count of the jobs waiting for it and
    of its progress, for the worker's metrics and liveness probe: a job that has made no
    progress (``progress``, or its start) for a long while means a wedged model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._lock = threading.Lock()
        self.waiting = 0  # jobs submitted, not started
        self.busy = False
        self._last_progress = time.monotonic()
        _every.add(self)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on the model's thread, with the caller's log context."""
        with self._lock:
            self.waiting += 1
        try:
            return self._executor.submit(contextvars.copy_context().run, self._job, fn, *args)
        except RuntimeError:  # the executor takes no work once shut down
            with self._lock:
                self.waiting -= 1
            raise InferenceError(f"model {self.name} is shutting down") from None

    def _job(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self.waiting -= 1
            self.busy = True
        self._last_progress = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy = False
            self._last_progress = time.monotonic()

    def progress(self) -> None:
        """Called by a long job (a generation, per token) as it moves on."""
        self._last_progress = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds the current job has gone without progress (0 when idle)."""
        return time.monotonic() - self._last_progress if self.busy else 0.0

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model's thread; waits for it and returns or raises its outcome."""
        future = self.submit(fn, *args)
        try:
            return future.result()
        except CancelledError:  # queued when the model closed
            raise InferenceError(f"model {self.name} is shutting down") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_every: weakref.WeakSet[ComputeThread] = weakref.WeakSet()


def compute_threads() -> list[ComputeThread]:
    """Every compute thread of this process (for the liveness probe)."""
    return list(_every)


_shared: dict[str, ComputeThread] = {}
_shared_lock = threading.Lock()


def shared_compute_thread(name: str) -> ComputeThread:
    """The process's compute thread called ``name``, started on first use."""
    with _shared_lock:
        if name not in _shared:
            _shared[name] = ComputeThread(name)
        return _shared[name]
