"""Remote-control commands an operator (or a test) can send to running workers.

``celery -A worker inspect model_stats`` prints each hosted model's counters (and the bulk
intake's). Celery's ``cancel_consumer``, ``add_consumer`` and ``active_queues`` also cover
the queues the bulk intake consumes (worker/intake/), which Celery's own consumer does not.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import Panel, control_command, inspect_command, ok

from models.registry import registry

_celery_cancel_consumer = Panel.data["cancel_consumer"]
_celery_add_consumer = Panel.data["add_consumer"]
_celery_active_queues = Panel.data["active_queues"]


def _intake() -> Any:
    from worker import lifecycle

    return lifecycle.intake


@inspect_command()
def model_stats(state: Any) -> dict[str, Any]:
    """Per model: requests, forward passes, rows per batch, padding efficiency."""
    out: dict[str, Any] = {"models": registry.stats(), "ready": registry.wait_ready(0)}
    if (intake := _intake()) is not None:
        out["intake"] = intake.stats.as_dict()
    return out


@control_command(args=[("queue", str)], signature="<queue>")
def cancel_consumer(state: Any, queue: str, **kwargs: Any) -> Any:
    """Tell worker(s) to stop consuming from task queue by name."""
    if (intake := _intake()) is not None and intake.pause(queue):
        return ok(f"no longer consuming from {queue}")
    return _celery_cancel_consumer(state, queue, **kwargs)


@control_command(
    args=[("queue", str), ("exchange", str), ("exchange_type", str), ("routing_key", str)],
    signature="<queue> [exchange [type [routing_key]]]",
)
def add_consumer(
    state: Any,
    queue: str,
    exchange: str | None = None,
    exchange_type: str | None = None,
    routing_key: str | None = None,
    **options: Any,
) -> Any:
    """Tell worker(s) to consume from task queue by name."""
    if (intake := _intake()) is not None and intake.resume(queue):
        return ok(f"add consumer {queue}")
    return _celery_add_consumer(state, queue, exchange, exchange_type, routing_key, **options)


@inspect_command()
def active_queues(state: Any) -> list[dict[str, Any]]:
    """List the task queues a worker is currently consuming from."""
    queues = list(_celery_active_queues(state))
    if (intake := _intake()) is not None:
        declared = state.app.amqp.queues
        queues += [dict(declared[q].as_dict(recurse=True)) for q in intake.active_queues() if q in declared]
    return queues
