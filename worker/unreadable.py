"""What the worker does with a task it will not run: a message it cannot read, or a task
that has been lost too many times. Its producer hears of it at once (CONTRACT §6)."""

from __future__ import annotations

import structlog

from wire.decode import Unreadable
from wire.errors import InvalidRequest, WorkerError

log = structlog.get_logger("worker")


def refuse(exc: Unreadable, *, queue: str, intake: str) -> None:
    """Log an unreadable message (already taken off its queue: it is never run), and fail
    its task with ``InvalidRequest`` where the task id could be read."""
    log.error("message.unreadable", reason=exc.reason, task_id=exc.task_id, task=exc.task, queue=queue, intake=intake)
    if exc.task_id:
        fail(exc.task_id, InvalidRequest(f"unreadable task message: {exc.reason}"), stream=exc.task == "generate")


def fail(task_id: str, error: WorkerError, *, stream: bool) -> None:
    """Store ``error`` as the task's result and, for a generation, end its stream with it.
    Best effort: a failure here is logged, never raised into the consumer."""
    from worker.celery_app import app
    from worker.streams import end_with_error

    try:  # the stream first, as a generation ends it before its result is stored
        if stream:
            services = app.services
            end_with_error(services.redis, task_id, type(error).__name__, str(error), services.stream_ttl)
        app.backend.mark_as_failure(task_id, error)
    except Exception as exc:  # noqa: BLE001
        log.error("task.fail_not_stored", task_id=task_id, error=str(exc))
