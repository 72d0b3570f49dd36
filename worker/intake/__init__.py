"""Bulk intake: the worker's own consumer for queues that carry only encoder models.

Celery runs one task per message: a Redis round trip to take it, a pool thread, the
tracer, a result store and an ack, each on its own. For an embedding of one sentence that
costs as much as the sentence's share of a batched forward pass. On these queues the
worker consumes instead with two threads:

* the intake thread takes up to ``intake_prefetch`` messages at once (source.py), reads,
  validates and tokenizes them, and submits them to their models' batchers together
  (dispatch.py), so they share forward passes;
* the completer thread answers each as its batcher completes it, storing results and
  acks in one pipeline for all that are ready (completer.py).

Producers see no difference: ``AsyncResult.get()`` and the contract's errors work as for
a Celery-run task, with the same error edge and ``task.done`` log (tasks/base.py).
Revoked and expired tasks are marked REVOKED without running; a message with a future
ETA is held until it is due; a message that uses Celery's canvas (link, link_error,
chain or chord), or names a task other than the four encoder tasks, runs through
Celery's own tracer in a side thread. Each message is a :class:`~worker.intake.job.Job`.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Sequence

import redis
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

from tasks.schemas import Limits
from wire.errors import InferenceError
from worker.intake.completer import Completer
from worker.intake.dispatch import Dispatcher
from worker.intake.events import TaskEvents
from worker.intake.job import Job, JobState
from worker.intake.source import QueueSource
from worker.intake.stats import IntakeStats

__all__ = ["BulkIntake", "Job"]

log = structlog.get_logger("worker")

RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
STALL_S = 60.0  # the loop goes round every few seconds at most; this long without, it is stuck


class BulkIntake:
    """Consumes ``queues`` for the encoder tasks; one intake and one completer thread."""

    def __init__(
        self,
        app: Celery,
        queues: Sequence[str],
        *,
        redis_url: str,
        prefetch: int,
        master_name: str | None = None,
        time_limits: dict[str, float],
        limits: Limits,
        hostname: str,
        task_events: bool = False,
    ) -> None:
        self.queues = list(queues)
        self.prefetch = prefetch
        self.stats = IntakeStats()
        self.source = QueueSource(app, self.queues, redis_url, self.stats, master_name)
        self.completer = Completer(
            app,
            self.source,
            time_limits=time_limits,
            stats=self.stats,
            stopping=lambda: self._stopping.is_set(),
            on_flushed=self._released,
            events=TaskEvents(app, hostname) if task_events else None,
        )
        self.dispatcher = Dispatcher(
            app,
            client=self.source.redis,
            time_limits=time_limits,
            limits=limits,
            hostname=hostname,
            stats=self.stats,
            on_done=lambda job, request: self.completer.inbox.put((job, request)),
            on_traced=lambda job: self.completer.inbox.put([job]),
        )
        self._held: list[tuple[float, int, Job]] = []  # ETA heap
        self._held_seq = 0
        self._inflight = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_loop = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Starts the threads; Redis need not answer yet (the intake waits for it)."""
        for target, name in ((self._intake_loop, "intake"), (self.completer.run, "intake-completer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("intake.started", queues=self.queues, prefetch=self.prefetch)

    def stop(self, timeout: float = 60.0) -> None:
        """Take no more messages; answer those in flight; hand held ones back."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        intake, completer = self._threads or (None, None)
        if intake is not None:
            intake.join(timeout)
        self.dispatcher.shutdown()
        self.completer.inbox.put(None)
        if completer is not None:
            completer.join(timeout)
        held = [job for _, _, job in self._held]
        self._held.clear()
        if held:
            self.source.restore(held)
        log.info("intake.stopped", **self.stats.as_dict())
        self.source.close()

    def holding(self) -> set[str]:
        """The delivery tags this intake holds (for worker/reclaim.py)."""
        return self.source.holding()

    def pause(self, queue: str) -> bool:
        """Stop taking from ``queue`` (Celery's ``cancel_consumer``); False if not ours."""
        if paused := self.source.pause(queue):
            log.info("intake.paused", queue=queue)
        return paused

    def resume(self, queue: str) -> bool:
        """Take from ``queue`` again (Celery's ``add_consumer``); False if not ours."""
        if resumed := self.source.resume(queue):
            log.info("intake.resumed", queue=queue)
        return resumed

    def active_queues(self) -> list[str]:
        return self.source.active_queues()

    # -- the intake thread --------------------------------------------------------------

    def stalled(self) -> str | None:
        """For the liveness probe: what is wrong, if the intake loop has stopped going round
        (it does at least every few seconds, Redis or no Redis)."""
        if self._threads and not self._stopping.is_set():
            idle = time.monotonic() - self._last_loop
            if idle > STALL_S:
                return f"the bulk intake's loop has not gone round for {idle:.0f}s"
        return None

    def _intake_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._last_loop = time.monotonic()
            try:
                self.source.maintain()
                self._release_due()
                room = self._wait_for_room()
                if room == 0:
                    continue
                jobs = self.source.take(room, until=self._held[0][0] if self._held else None)
                if failures:
                    log.info("intake.redis_back", after_failures=failures)
                failures = 0
                if jobs:
                    self._dispatch(jobs, read=True)
            except (redis.RedisError, OperationalError) as exc:
                delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
                failures += 1
                self.source.lost_connection()
                log.warning("intake.redis_error", error=str(exc), retry_in_s=delay)
                self._stopping.wait(delay)
            except Exception:  # never let the thread die: log and go on
                log.exception("intake.crashed")
                self._stopping.wait(1.0)

    def _wait_for_room(self) -> int:
        """How many more messages may be taken; 0 after a short wait when none (the loop
        then releases held messages that have come due and asks again)."""
        with self._cond:
            if self._inflight >= self.prefetch and not self._stopping.is_set():
                self._cond.wait(0.1 if self._held else 0.5)
            return 0 if self._stopping.is_set() else max(0, self.prefetch - self._inflight)

    def _dispatch(self, jobs: list[Job], *, read: bool) -> None:
        """Counts ``jobs`` as held until the completer has answered them; those held for an
        ETA leave the count until they come due. Every job reaches the completer, or the
        ETA heap, or Celery's tracer (which hands it to the completer), whatever happens."""
        with self._cond:
            self._inflight += len(jobs)
        to_complete: list[Job] = jobs
        held: list[Job] = []
        try:
            to_complete, held = self.dispatcher.dispatch(jobs, read=read)
        except Exception as exc:  # noqa: BLE001 - dispatch guards each job; this is the last line
            log.exception("intake.dispatch_failed", jobs=len(jobs))
            for job in jobs:
                if not job.settled and job.pending is None:
                    job.settle(JobState.FAILURE, "error", error=InferenceError(f"{type(exc).__name__}: {exc}"))
        finally:
            for job in held:
                self._held_seq += 1
                heapq.heappush(self._held, (job.eta, self._held_seq, job))  # type: ignore[arg-type]
            if held:
                self._released(len(held))
            if to_complete:
                self.completer.inbox.put(to_complete)

    def _release_due(self) -> None:
        now = time.time()
        due: list[Job] = []
        while self._held and self._held[0][0] <= now:
            job = heapq.heappop(self._held)[2]
            job.eta = None
            due.append(job)
        if due:
            self._dispatch(due, read=False)

    def _released(self, count: int) -> None:
        with self._cond:
            self._inflight -= count
            self._cond.notify_all()
