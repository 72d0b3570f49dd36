"""What a task needs from Redis beyond Celery, as ``app.services`` (tasks/ports.py says
what tasks may ask of it): a generation's stream and cancel check, and how often a task
was lost. One Redis connection pool per worker process, made on first use (after any
fork), shared by every task thread."""

from __future__ import annotations

import threading

import redis

from wire.keys import REDELIVERIES
from worker.streams import CancelWatch, StreamPublisher, replay


class RedisServices:
    def __init__(self, redis_url: str, stream_ttl: int) -> None:
        self.redis_url = redis_url
        self.stream_ttl = stream_ttl
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    @property
    def redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(self.redis_url, health_check_interval=30)
            return self._client

    def publisher(self, task_id: str) -> StreamPublisher:
        return StreamPublisher(self.redis, task_id, self.stream_ttl)

    def cancel_watch(self, task_id: str) -> CancelWatch:
        return CancelWatch(self.redis, task_id)

    def stream_since_reset(self, task_id: str) -> list[dict]:
        return replay(self.redis, task_id)

    def times_lost(self, task_id: str) -> int:
        """How often the task was handed back after its worker died (worker/reclaim.py);
        0 where Redis does not answer."""
        try:
            return int(self.redis.hget(REDELIVERIES, task_id) or 0)
        except redis.RedisError:
            return 0
