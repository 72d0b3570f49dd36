"""The typed error tree that crosses the wire.

These classes are raised by runtimes and tasks, stored by Celery in the result backend
as ``{"exc_type", "exc_message", "exc_module"}``, and re-raised by producers. A producer
without this code still sees the class *name* (Celery rebuilds an exception of that
name), which is what CONTRACT §6 promises. Keep them dependency-free and constructible
from a single message argument so they round-trip through JSON.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error a task reports on purpose."""


class InvalidRequest(WorkerError):
    """The request is wrong; retrying it cannot help. The message names the field."""


class InferenceError(WorkerError):
    """Inference failed after the worker's own recovery."""


class TransientError(WorkerError):
    """A failure that may pass (a lost connection); tasks retry these."""


class Overloaded(TransientError):
    """The model's slots and its admission queue are full: the task is retried later,
    on whichever worker has room."""


class Cancelled(WorkerError):
    """Raised inside a runtime to unwind a cancelled request."""


class TimeLimitReached(InferenceError):
    """The task ran past its kind's time limit and was stopped."""
