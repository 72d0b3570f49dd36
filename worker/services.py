"""What a task needs from Redis beyond Celery, as ``app.services`` (tasks/ports.py says
what tasks may ask of it): a generation's stream and cancel check, and how often a task
was lost. One Redis connection pool per worker process, made on first use (after any
fork), shared by every task thread."""

from __future__ import annotations

import threading
from typing import Any

import redis

from wire import connect
from wire.keys import REDELIVERIES
from worker.streams import CancelWatch, StreamPublisher, replay


class RedisServices:
    def __init__(self, redis_url: str, stream_ttl: int, master_name: str | None = None) -> None:
        self.redis_url = redis_url
        self.master_name = master_name
        self.stream_ttl = stream_ttl
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    @property
    def redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = connect.client(self.redis_url, self.master_name, health_check_interval=30)
            return self._client

    def publisher(self, task_id: str) -> StreamPublisher:
        return StreamPublisher(self.redis, task_id, self.stream_ttl)

    def cancel_watch(self, task_id: str) -> CancelWatch:
        return CancelWatch(self.redis, task_id)

    def stream_since_reset(self, task_id: str) -> list[dict]:
        return replay(self.redis, task_id)

    def generation_timer(self, model: str, queue: str) -> Any:
        """Times a generation's tokens for the metrics (None where they are off)."""
        from worker import metrics

        return metrics.active.generation(model, queue) if metrics.active is not None else None

    def times_lost(self, task_id: str) -> int:
        """How often the task was handed back after its worker died (worker/reclaim.py);
        0 where Redis does not answer."""
        try:
            return int(self.redis.hget(REDELIVERIES, task_id) or 0)
        except redis.RedisError:
            return 0
