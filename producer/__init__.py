"""A producer client for web apps: send a task, await its result, read its token stream.

Imports neither torch nor transformers. It is a convenience over CONTRACT.md; a producer
that uses plain ``celery.Celery.send_task`` (or any Celery-protocol client) works as well.
"""

from producer.client import InferenceClient, TaskFailed
from wire.errors import InferenceError, InvalidRequest, WorkerError

__all__ = ["InferenceClient", "InferenceError", "InvalidRequest", "TaskFailed", "WorkerError"]
