"""Celery's Redis result backend, riding out a Redis outage on reads as on writes.

Celery retries a result's write (``retry_policy``), but storing a result first reads the
task's current state, and that read is not retried: a task finishing while Redis
restarts lost its result. Here reads retry under the same policy.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.backends.redis import SentinelBackend as CelerySentinelBackend


class _RetriedReads:
    def get(self, key: Any) -> Any:
        return self.ensure(super().get, (key,))  # type: ignore[attr-defined,misc]

    def mget(self, keys: Any) -> Any:
        return self.ensure(super().mget, (keys,))  # type: ignore[attr-defined,misc]


class RedisBackend(_RetriedReads, CeleryRedisBackend):
    pass


class SentinelBackend(_RetriedReads, CelerySentinelBackend):
    pass


def backend_url(redis_url: str) -> str:
    """``result_backend`` for the worker: these classes, for ``redis://``, ``rediss://``
    and ``sentinel://`` URLs."""
    scheme = redis_url.partition("://")[0]
    cls = {"redis": "RedisBackend", "rediss": "RedisBackend", "sentinel": "SentinelBackend"}.get(scheme)
    return f"{__name__}:{cls}+{redis_url}" if cls else redis_url
