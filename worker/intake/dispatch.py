"""From message to forward pass: read each job, route it, validate and tokenize it, and
submit those that run here to their models' batchers together, so they share passes.

Every job ends up settled (refused, revoked, invalid, a duplicate), held for its ETA, with
Celery's tracer, or in a batcher; a fault in one job is settled as that job's failure
and costs the others nothing.
"""

from __future__ import annotations

import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import structlog
from celery import Celery
from celery.exceptions import NotRegistered, TaskRevokedError

from tasks.base import contract_error, validate
from tasks.encoders import PLANNERS
from tasks.schemas import Limits
from wire import keys
from wire.decode import TaskMessage, Unreadable, decode, loads
from worker import metrics
from worker.intake.job import Job, JobState
from worker.intake.stats import IntakeStats
from worker.unreadable import refuse

log = structlog.get_logger("worker")


class Dispatcher:
    def __init__(
        self,
        app: Celery,
        *,
        client: redis.Redis,
        time_limits: dict[str, float],
        limits: Limits,
        hostname: str,
        stats: IntakeStats,
        on_done: Any,
        on_traced: Any,
    ) -> None:
        self.app = app
        self.client = client
        self.time_limits = time_limits
        self.limits = limits
        self.hostname = hostname
        self.stats = stats
        self.on_done = on_done  # called with (job, request) as a batcher completes a job's request
        self.on_traced = on_traced  # called with a job Celery's tracer has run
        self._tracer_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="intake-trace")
        self._tracers: dict[str, Any] = {}

    def dispatch(self, jobs: list[Job], *, read: bool) -> tuple[list[Job], list[Job]]:
        """(the jobs for the completer, the jobs held for their ETA); ``read``: the jobs
        are new (held ones come back due, already read)."""
        if read:
            for job in jobs:
                self._guarded(self.read, job)
            self.drop_duplicates([job for job in jobs if not job.settled and job.redelivered])
        now = time.time()
        answer: list[Job] = []
        runnable: list[Job] = []
        held: list[Job] = []
        for job in jobs:
            where = self._guarded(self.route, job, now) or "answer"
            if where == "held":
                held.append(job)
            elif where == "runnable":
                runnable.append(job)
            elif where == "answer":
                answer.append(job)
        self.submit(runnable)
        return answer + runnable, held

    def _guarded(self, step: Any, job: Job, *args: Any) -> Any:
        try:
            return step(job, *args)
        except Exception as exc:  # noqa: BLE001 - this job's fault, not its neighbours'
            self._unexpected(job, exc)
            return None

    def read(self, job: Job) -> None:
        """Fill the job from its message, or refuse it (settled, never run)."""
        try:
            message: TaskMessage = decode(job.raw)
        except Unreadable as exc:
            self.stats.refused += 1
            job.task_id, job.name = exc.task_id, exc.task
            job.settle(JobState.REFUSED, "refused")
            refuse(exc, queue=keys.queue_of_key(job.key), intake="bulk")
            return
        job.task_id, job.name, job.headers = message.task_id, message.name, message.headers
        job.args, job.kwargs, job.embed = message.args, message.kwargs, message.embed
        job.queue = message.routing_key or keys.queue_of_key(job.key)
        job.eta, job.expires = message.eta, message.expires
        job.redelivered = bool(message.headers.get("redelivered"))
        model = message.kwargs.get("model")
        job.model = model if isinstance(model, str) else None
        if (m := metrics.active) is not None:
            m.request(str(job.model), str(job.name), job.queue, sent_at=message.headers.get("sent_at"))

    def drop_duplicates(self, jobs: list[Job]) -> None:
        """A message handed back after its worker died may have been answered already (the
        worker died between storing the result and the ack): ack it, never run it twice."""
        if not jobs:
            return
        backend = self.app.backend
        try:
            stored = self.client.mget([backend.get_key_for_task(job.task_id) for job in jobs])
        except redis.RedisError:
            return  # run them: a result stored twice beats none
        for job, raw in zip(jobs, stored):
            try:
                status = loads(raw).get("status") if raw else None
            except (ValueError, AttributeError):
                status = None
            if status in (JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED):
                self.stats.duplicates += 1
                job.settle(JobState.DUPLICATE, "duplicate")
                log.info("intake.duplicate_dropped", task_id=job.task_id, task=job.name)

    def route(self, job: Job, now: float) -> str:
        """Where a read job goes next: answer (settled already, or revoked), held (for its
        ETA), traced (Celery's tracer has it) or runnable (prepared for a batcher)."""
        from celery.worker import state as worker_state

        if job.settled:
            return "answer"
        if job.task_id in worker_state.revoked:
            return self._revoke(job, "revoked")
        if job.expires is not None and job.expires <= now:
            return self._revoke(job, "expired")
        if job.eta is not None and job.eta > now:
            return "held"  # it stays in the unacked hash, and out of the prefetch count
        if job.name not in PLANNERS or any(job.embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
            self._tracer_pool.submit(self.trace, job)
            return "traced"
        self.prepare(job)
        return "answer" if job.settled else "runnable"

    def _revoke(self, job: Job, reason: str) -> str:
        """A revoked task is cancelled before it starts (CONTRACT §5); an expired one is
        past its ``expires``."""
        self.stats.revoked += 1
        outcome = "cancelled" if reason == "revoked" else reason
        job.settle(JobState.REVOKED, outcome, error=TaskRevokedError(reason))
        return "answer"

    def prepare(self, job: Job) -> None:
        """Validate, plan and tokenize; the time limit runs from here, as a Celery task's
        from its start (a message held for its ETA starts its clock when it comes due)."""
        schema, planner = PLANNERS[job.name]  # type: ignore[index]
        try:
            request = validate(job.name, schema, job.args, job.kwargs, self.limits)  # type: ignore[arg-type]
            job.plan = planner(request)
            started = time.perf_counter()
            job.prepared = job.plan.prepare()
            job.tokenize_s = time.perf_counter() - started
            job.runtime = job.plan.runtime
            job.deadline = time.monotonic() + self.time_limits.get(job.name, 60.0)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the error edge
            self._failed(job, exc)

    def submit(self, jobs: list[Job]) -> None:
        by_runtime: dict[int, list[Job]] = {}
        for job in jobs:
            by_runtime.setdefault(id(job.runtime), []).append(job)
        for group in by_runtime.values():
            batcher = group[0].runtime.batcher
            try:
                pending = batcher.submit_many(
                    [job.prepared.items for job in group],
                    on_done=lambda request, jobs=group: self.on_done(jobs[request.index], request),
                )
            except Exception as exc:  # noqa: BLE001 - the group fails, the intake goes on
                for job in group:
                    self._failed(job, exc)
                continue
            for job, request in zip(group, pending):
                job.pending = request

    def trace(self, job: Job) -> None:
        """Celery's own execution, for messages this intake does not serve natively."""
        from celery.app.trace import build_tracer

        self.stats.traced += 1
        try:
            task = self.app.tasks.get(job.name)  # type: ignore[arg-type]
            if task is None:
                log.error("intake.unregistered_task", task=job.name, task_id=job.task_id)
                job.settle(JobState.FAILURE, "unregistered", error=NotRegistered(job.name))
            else:
                tracer = self._tracers.get(job.name)  # type: ignore[arg-type]
                if tracer is None:
                    tracer = build_tracer(job.name, task, app=self.app, hostname=self.hostname, eager=False)
                    self._tracers[job.name] = tracer  # type: ignore[index]
                request = {
                    **job.headers,
                    **job.embed,
                    "args": job.args,
                    "kwargs": job.kwargs,
                    "hostname": self.hostname,
                    "is_eager": False,
                    "delivery_info": {"exchange": job.queue, "routing_key": job.queue},
                }
                tracer(job.task_id, job.args, job.kwargs, request)
                job.settle(JobState.TRACED, "traced")  # Celery stored the result
        except Exception as exc:  # noqa: BLE001
            self._unexpected(job, exc)
        self.on_traced(job)

    def _failed(self, job: Job, exc: Exception) -> None:
        outcome, error = contract_error(exc, **context(job))
        tb = None if outcome == "invalid" else traceback.format_exc()
        job.settle(JobState.FAILURE, outcome, error=error, tb=tb)

    def _unexpected(self, job: Job, exc: Exception) -> None:
        if not job.settled:
            self._failed(job, exc)

    def shutdown(self) -> None:
        self._tracer_pool.shutdown(wait=True)


def context(job: Job) -> dict[str, Any]:
    """The log context of a job's task, as a Celery-run task binds it."""
    return {"task_id": job.task_id, "task": job.name, "model": job.model, "queue": job.queue}
