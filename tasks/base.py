"""What every task shares: the error edge, bound log context, timing.

A task body is ``serve(self, kind, schema, args, kwargs, handler)``: the request is
validated (``InvalidRequest`` names the field and is never retried), the handler finds
its runtime and calls it, and anything unexpected becomes ``InferenceError`` here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from tasks.schemas import Limits, Request, parse
from wire.errors import InferenceError, InvalidRequest, TimeLimitReached, TransientError, WorkerError

log = structlog.get_logger("tasks")
R = TypeVar("R", bound=Request)


class InferenceTask(Task):
    throws = (InvalidRequest,)  # expected: logged without a traceback
    autoretry_for = (TransientError,)
    retry_backoff = True
    max_retries = 3
    typing = False  # arguments are checked by the request schema, with better messages
    resultrepr_maxsize = 64  # celery reprs every result for its own logs; ours log timings instead
    _limits: Limits | None = None

    def limits(self) -> Limits:
        if self._limits is None:
            settings = self.app.settings
            type(self)._limits = Limits(max_items=settings.max_items, max_text_chars=settings.max_text_chars)
        return self._limits  # type: ignore[return-value]


def drop_if_answered(task: Task) -> None:
    """A task handed back after its worker died may have been answered already (the worker
    died between storing its result and acking it): then it is dropped (``Ignore``: nothing
    stored), never run twice. Only a redelivered task pays for the look."""
    request = task.request
    if not (request.delivery_info or {}).get("redelivered"):
        return
    if task.backend.get_task_meta(request.id).get("status") in states.READY_STATES:
        log.info("task.duplicate_dropped", task_id=request.id, task=task.name)
        raise Ignore()


def validate(kind: str, schema: type[R], args: Any, kwargs: Any, limits: Limits) -> R:
    """The request as its schema, or ``InvalidRequest`` naming what is wrong."""
    if args:
        raise InvalidRequest(f"{kind} takes keyword arguments only; got {len(args)} positional argument(s)")
    if not isinstance(kwargs, dict):
        raise InvalidRequest(f"{kind}: keyword arguments must be an object, got {type(kwargs).__name__}")
    return parse(schema, kwargs, limits)


def serve(
    task: InferenceTask,
    kind: str,
    schema: type[R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    handler: Callable[[R], dict[str, Any]],
) -> dict[str, Any]:
    request = task.request
    model = kwargs.get("model")
    structlog.contextvars.bind_contextvars(
        task_id=request.id,
        task=kind,
        model=model if isinstance(model, str) else None,
        queue=(request.delivery_info or {}).get("routing_key"),
    )
    started = time.perf_counter()
    outcome, error = "error", None
    try:
        result = handler(validate(kind, schema, args, kwargs, task.limits()))
        outcome = "cancelled" if result.get("finish_reason") == "cancelled" else "success"
        return result
    except Exception as exc:
        outcome, error = contract_error(exc)
        if error is exc:
            raise
        raise error from None
    finally:
        log_done(outcome, time.perf_counter() - started, error)
        structlog.contextvars.clear_contextvars()


def contract_error(exc: Exception, **context: Any) -> tuple[str, WorkerError]:
    """The error edge, for Celery-run tasks and the bulk intake alike: the outcome to log
    and the contract's error for an exception raised while serving a task. A wrong request
    stays ``InvalidRequest``, the worker's own errors stay as they are, and anything else
    is logged with its traceback (``task.failed``) and becomes ``InferenceError``.

    Outcomes: ``success`` and ``cancelled`` (CONTRACT §5) come from ``serve``; here
    ``invalid``, ``timeout`` (a time limit), ``retry`` (a transient error: the task is
    retried) and ``error``."""
    if isinstance(exc, InvalidRequest):
        return "invalid", exc
    if isinstance(exc, TimeLimitReached):
        return "timeout", exc
    if isinstance(exc, TransientError):
        return "retry", exc
    if isinstance(exc, WorkerError):
        return "error", exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return "timeout", TimeLimitReached(f"time limit reached: {exc}")
    log.error("task.failed", exc_info=exc, **context)
    return "error", InferenceError(f"{type(exc).__name__}: {exc}")


def log_done(outcome: str, seconds: float, error: BaseException | None = None, **context: Any) -> None:
    """One ``task.done`` line per task (and ``task.rejected`` before it for a wrong request)."""
    if outcome == "invalid":
        log.info("task.rejected", error=str(error), **context)
    log.info("task.done", outcome=outcome, duration_ms=round(seconds * 1000, 2), **context)
