"""Token streams and cancellation in Redis (CONTRACT §4 and §5).

Every message goes to the Redis Stream ``stream:<task_id>`` (field ``data``), for
readers that come late or reconnect, and then to the pub/sub channel of the same name,
for readers already listening; the Stream's key expires ``stream_ttl`` seconds after
its last message. ``seq`` starts at 0 and grows by one; a stream ends with exactly one
``end`` or ``error`` message.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

from worker.celery_app import current_settings

_client: redis.Redis | None = None
_client_lock = threading.Lock()

STREAM_PREFIX = "stream:"
CANCEL_PREFIX = "cancel:"


def worker_redis() -> redis.Redis:
    """One connection pool per worker process, shared by every task thread."""
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(current_settings().redis_url, health_check_interval=30)
        return _client


class StreamPublisher:
    def __init__(self, client: redis.Redis, task_id: str, ttl: int) -> None:
        self.client = client
        self.task_id = task_id
        self.key = STREAM_PREFIX + task_id
        self.ttl = ttl
        self.seq = 0
        self.closed = False

    def _emit(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise RuntimeError(f"stream {self.key} already ended")
        data = json.dumps({"task_id": self.task_id, "seq": self.seq, **message}, ensure_ascii=False)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {"data": data})
        if self.seq == 0 or message["type"] != "token":
            # the first message bounds an orphaned stream (a worker that died); the last
            # one restarts the clock, so the Stream lives ``ttl`` after its end
            pipe.expire(self.key, self.ttl)
        pipe.publish(self.key, data)
        pipe.execute()
        self.seq += 1

    def token(self, text: str) -> None:
        self._emit({"type": "token", "text": text})

    def end(self, finish_reason: str, usage: dict[str, int]) -> None:
        self._emit({"type": "end", "finish_reason": finish_reason, "usage": usage})
        self.closed = True

    def error(self, error_type: str, message: str) -> None:
        if not self.closed:
            self._emit({"type": "error", "error": {"type": error_type, "message": message}})
            self.closed = True


class CancelWatch:
    """True once the task is revoked or its ``cancel:<task_id>`` key is set.

    The revoked set is the worker's own memory (filled by ``revoke()`` broadcasts), so it
    is checked every call; the Redis key costs a round trip, so it is checked at most
    every ``poll_s`` seconds, which bounds how late a cancellation is seen.
    """

    def __init__(self, client: redis.Redis, task_id: str, poll_s: float = 0.05) -> None:
        self.client = client
        self.task_id = task_id
        self.key = CANCEL_PREFIX + task_id
        self.poll_s = poll_s
        self._next_poll = 0.0
        self.cancelled = False

    def __call__(self) -> bool:
        if self.cancelled:
            return True
        from celery.worker import state

        if self.task_id in state.revoked:
            self.cancelled = True
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            self.cancelled = bool(self.client.exists(self.key))
        return self.cancelled
