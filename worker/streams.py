"""Token streams and cancellation in Redis (CONTRACT §4 and §5).

Every message goes to the Redis Stream ``stream:<task_id>`` (field ``data``), for
readers that come late or reconnect, and then to the pub/sub channel of the same name,
for readers already listening; the Stream's key expires ``stream_ttl`` seconds after
its last message. ``seq`` starts at 0 and grows by one; a stream ends with exactly one
``end`` or ``error`` message. A generation delivered again (its first worker died) goes
on with ``seq`` after the last message already in the Stream, starting with a ``reset``
message (CONTRACT §4, v1.1).

A Redis outage does not end a generation: the writer sends again what it could not send
for up to ``WRITE_RETRY_S`` seconds (a reader drops a message it already has by its
``seq``), and the cancel check treats an unanswered poll as "not cancelled".
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from typing import Any

import redis
import structlog

from wire.keys import CANCEL_PREFIX, STREAM_PREFIX

log = structlog.get_logger(__name__)

WRITE_RETRY_S = 30.0
RETRY_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)
FINAL_TYPES = ("end", "error")


def last_message(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    """The last message in the task's Stream, if it has one."""
    entries = client.xrevrange(STREAM_PREFIX + task_id, count=1)
    if not entries:
        return None
    fields = entries[0][1]
    return json.loads(fields.get(b"data", fields.get("data")))


def replay(client: redis.Redis, task_id: str) -> list[dict[str, Any]]:
    """The messages of the task's Stream since its last ``reset``."""
    messages = [
        json.loads(fields.get(b"data", fields.get("data"))) for _, fields in client.xrange(STREAM_PREFIX + task_id)
    ]
    start = max((i + 1 for i, m in enumerate(messages) if m.get("type") == "reset"), default=0)
    return messages[start:]


def end_with_error(client: redis.Redis, task_id: str, error_type: str, message: str, ttl: int) -> None:
    """End a task's stream with an ``error`` message, after whatever it already holds
    (for a task that fails without running: it could not be read, or was lost too often)."""
    last = last_message(client, task_id)
    if last is not None and last.get("type") in FINAL_TYPES:
        return
    seq = last["seq"] + 1 if last is not None else 0
    data = json.dumps(
        {"task_id": task_id, "seq": seq, "type": "error", "error": {"type": error_type, "message": message}},
        ensure_ascii=False,
    )
    key = STREAM_PREFIX + task_id
    with client.pipeline(transaction=False) as pipe:
        pipe.xadd(key, {"data": data}).expire(key, ttl).publish(key, data)
        pipe.execute()


class StreamPublisher:
    """Publishes one generation's stream, in order, without making the generation wait.

    ``token`` only queues the message: a writer thread sends what is queued in one
    pipelined round trip (several messages at once when it falls behind), so decoding
    overlaps the Redis writes. ``end`` and ``error`` queue the last message and wait
    until everything is written, so the stream is complete before the task's result is
    stored. A failed write is raised by the next call.
    """

    IDLE_EXIT_S = 5.0  # the writer thread ends after this long with nothing to send
    write_retry_s = WRITE_RETRY_S

    def __init__(self, client: redis.Redis, task_id: str, ttl: int) -> None:
        self.client = client
        self.task_id = task_id
        self.key = STREAM_PREFIX + task_id
        self.ttl = ttl
        self.seq = 0
        self.emitted = 0
        self.closed = False
        self._queue: queue.SimpleQueue[tuple[str, bool] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None

    def resume(self, attempt: int) -> dict[str, Any] | None:
        """Before the first token: go on after what the Stream already holds, with a
        ``reset`` message, when an earlier delivery of this task wrote some of it. Returns
        the Stream's last message before this delivery (None for a new stream)."""
        last = last_message(self.client, self.task_id)
        if last is not None and last.get("type") not in FINAL_TYPES:
            self.seq = int(last["seq"]) + 1
            self._emit({"type": "reset", "attempt": max(attempt, 2)})
        return last

    def token(self, text: str) -> None:
        self._emit({"type": "token", "text": text})

    def end(self, finish_reason: str, usage: dict[str, int]) -> None:
        self._emit({"type": "end", "finish_reason": finish_reason, "usage": usage}, last=True)

    def error(self, error_type: str, message: str) -> None:
        """Best effort: the task is failing already, and a failed write must not mask why."""
        if self.closed:
            return
        try:
            self._emit({"type": "error", "error": {"type": error_type, "message": message}}, last=True)
        except (RuntimeError, TimeoutError) as exc:
            log.warning("stream.error_not_written", key=self.key, reason=str(exc))

    def _emit(self, message: dict[str, Any], last: bool = False) -> None:
        if self.closed:
            raise RuntimeError(f"stream {self.key} already ended")
        if self._failure is not None:
            self.closed = self.closed or last
            self._raise_failure()
        data = json.dumps({"task_id": self.task_id, "seq": self.seq, **message}, ensure_ascii=False)
        # the first message bounds an orphaned stream (a worker that died); the last one
        # restarts the clock, so the Stream lives ``ttl`` after its end
        expire = self.emitted == 0 or last
        self.seq += 1
        self.emitted += 1
        with self._lock:
            self._queue.put((data, expire))
            if last:
                self.closed = True
                self._queue.put(None)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=f"stream-{self.task_id}", daemon=True)
                self._writer.start()
            writer = self._writer
        if last:
            flush_timeout = self.write_retry_s + 10.0
            writer.join(flush_timeout)
            if writer.is_alive():
                raise TimeoutError(f"stream {self.key}: not written within {flush_timeout:.0f}s")
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"stream {self.key}: write failed: {self._failure}") from self._failure

    def _write_loop(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=self.IDLE_EXIT_S)]
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._writer = None
                        return
                continue
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._failure is None:
                try:
                    self._send_retrying([item for item in batch if item is not None])
                except Exception as exc:  # noqa: BLE001 - handed to the generation thread
                    self._failure = exc
            if None in batch:
                return

    def _send_retrying(self, items: list[tuple[str, bool]]) -> None:
        """Send, riding out a Redis outage of up to ``write_retry_s`` seconds."""
        give_up = time.monotonic() + self.write_retry_s
        for attempt in itertools.count():
            try:
                return self._send(items)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= give_up:
                    raise
                if attempt == 0:
                    log.warning("stream.write_retrying", key=self.key, error=str(exc))
                time.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])

    def _send(self, items: list[tuple[str, bool]]) -> None:
        if not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for data, expire in items:
            pipe.xadd(self.key, {"data": data})
            if expire:
                pipe.expire(self.key, self.ttl)
            pipe.publish(self.key, data)
        pipe.execute()


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
            try:
                self.cancelled = bool(self.client.exists(self.key))
            except redis.RedisError:  # Redis away: not cancelled as far as we know; poll again later
                self._next_poll = now + 1.0
        return self.cancelled
