"""Celery task events for the jobs the bulk intake answers (``task_events``), so Flower and
celery-exporter count encoder tasks like any others: task-received, task-started and
task-succeeded or task-failed (or task-revoked), with their own times, sent in batches
(Celery's buffered ``task.multi`` messages) from the completer thread after each store."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog
from celery import Celery

from worker.intake.job import Job, JobState

log = structlog.get_logger("worker")

BUFFER = 256  # events per message


class TaskEvents:
    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._connection: Any = None
        self._dispatcher: Any = None

    def send(self, jobs: list[Job]) -> None:
        """Best effort: events that cannot be sent are dropped (and logged), never retried."""
        try:
            dispatcher = self._open()
            now_wall, now = time.time(), time.monotonic()
            for job in jobs:
                if job.task_id is None or job.state in (JobState.REFUSED, JobState.DUPLICATE, JobState.TRACED):
                    continue
                self._job(dispatcher, job, taken=now_wall - (now - job.received), done=now_wall)
            dispatcher.flush()
        except Exception as exc:  # noqa: BLE001
            log.warning("intake.events_not_sent", error=str(exc), jobs=len(jobs))
            self.close()

    def _job(self, dispatcher: Any, job: Job, *, taken: float, done: float) -> None:
        fields = {"uuid": job.task_id}
        headers = job.headers
        dispatcher.send(
            "task-received",
            **fields,
            name=job.name,
            args=headers.get("argsrepr", ""),
            kwargs=headers.get("kwargsrepr", ""),
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            retries=headers.get("retries", 0),
            eta=headers.get("eta"),
            expires=headers.get("expires"),
            timestamp=taken,
        )
        if job.state is JobState.REVOKED:
            dispatcher.send("task-revoked", **fields, terminated=False, signum=None, expired=job.outcome == "expired")
            return
        dispatcher.send("task-started", **fields, timestamp=taken)
        if job.state is JobState.SUCCESS:
            dispatcher.send("task-succeeded", **fields, result="", runtime=done - taken, timestamp=done)
        else:
            dispatcher.send("task-failed", **fields, exception=repr(job.error), traceback=job.tb or "", timestamp=done)

    def _open(self) -> Any:
        if self._dispatcher is None:
            self._connection = self.app.connection_for_write()
            self._dispatcher = self.app.events.Dispatcher(
                self._connection, hostname=self.hostname, enabled=True, buffer_group=["task"], buffer_limit=BUFFER
            )
        return self._dispatcher

    def close(self) -> None:
        for close in (getattr(self._dispatcher, "close", None), getattr(self._connection, "release", None)):
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        self._dispatcher = self._connection = None
