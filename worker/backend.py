"""Celery's Redis result backend, riding out a Redis outage on reads as on writes.

Celery retries a result's write (``retry_policy``), but storing a result first reads the
task's current state, and that read is not retried: a task finishing while Redis
restarts lost its result. Here reads retry under the same policy.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend as CeleryRedisBackend


class RedisBackend(CeleryRedisBackend):
    def get(self, key: Any) -> Any:
        return self.ensure(super().get, (key,))

    def mget(self, keys: Any) -> Any:
        return self.ensure(super().mget, (keys,))


def backend_url(redis_url: str) -> str:
    """``result_backend`` for the worker: this class, on ``redis://`` and ``rediss://``."""
    scheme = redis_url.partition("://")[0]
    return f"{__name__}:RedisBackend+{redis_url}" if scheme in ("redis", "rediss") else redis_url
