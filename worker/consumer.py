"""Celery's consumer, with one change: a message its request code cannot take is refused,
never fatal.

The transport (worker/transport.py) already keeps out every message that
:func:`wire.decode.decode` cannot read. This is the second line: any other exception
from Celery's handling of one message (a case the check did not foresee) acks that
message and fails its task, as an unreadable one, instead of stopping the worker.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from wire.decode import Unreadable

logger = get_logger(__name__)


class Consumer(CeleryConsumer):
    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        connection_errors = self.connection_errors

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001
                from worker.unreadable import refuse

                headers = message.headers if isinstance(message.headers, dict) else {}
                task_id, task = headers.get("id"), headers.get("task")
                reason = f"{type(exc).__name__} in Celery's request handling: {exc}"
                refuse(
                    Unreadable(
                        reason,
                        task_id=task_id if isinstance(task_id, str) else None,
                        task=task if isinstance(task, str) else None,
                    ),
                    queue=(message.delivery_info or {}).get("routing_key") or "",
                    intake="celery",
                )
                if not message.acknowledged:
                    message.ack_log_error(logger, connection_errors)
                return None

        return on_task_received
