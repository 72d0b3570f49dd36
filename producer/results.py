"""Waiting for task results over one shared pub/sub connection per client.

Celery's Redis backend publishes every state it stores on the channel named after the
result key, ``celery-task-meta-<task id>``. The client names its tasks with an id prefix
of its own (``<prefix>-...``, still UUID-shaped) and subscribes once, to the pattern
``celery-task-meta-<prefix>-*``. So waiting for a result costs no SUBSCRIBE and
UNSUBSCRIBE of its own: one listener (a thread, or a task per event loop) hands each
final result to its waiter. A web app awaiting thousands of results holds one pub/sub
connection, not one per request.

A waiter registered before its task is sent needs nothing more. One registered after
(``wait(task_id)``) reads the key once, in case the result came first. An id without the
prefix (chosen by the caller) gets a channel subscription of its own. If a message is
lost (a reconnect), the waiter re-reads the key every ``RECHECK_S`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

RESULT_PREFIX = "celery-task-meta-"
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RECHECK_S = 2.0
SUBSCRIBE_TIMEOUT_S = 10.0


def _final(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    meta = json.loads(raw)
    return meta if meta.get("status") in FINAL_STATES else None


def _result_message(message: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """(result key, final meta or None) of a pub/sub message."""
    if message is None or message.get("type") not in ("message", "pmessage"):
        return "", None
    channel = message["channel"]
    key = channel.decode() if isinstance(channel, bytes) else channel
    return key, _final(message["data"])


class _Ids:
    """Task ids with a prefix of this client's own, and the pattern that matches them."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:8]
        self.pattern = f"{RESULT_PREFIX}{self.prefix}-*"

    def new(self) -> str:
        """A UUID4 whose first group is the prefix (90 random bits remain)."""
        return f"{self.prefix}{str(uuid.uuid4())[8:]}"

    def own(self, task_id: str) -> bool:
        return task_id.startswith(self.prefix + "-")


@dataclass(frozen=True)
class Pending:
    """A registered waiter; its waiter's ``result`` collects it, once."""

    task_id: str
    key: str
    own: bool  # covered by the pattern subscription: no subscription of its own


def _timed_out(task_id: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"task {task_id}: no result within {timeout:.1f}s")


class ResultWaiter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._ids = _Ids()
        self._pubsub = client.pubsub()  # subscribe confirmations are read, and skipped, below
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def new_task_id(self) -> str:
        return self._ids.new()

    def expect(self, task_id: str) -> Pending:
        """Register for ``task_id``'s result; before sending it, so nothing is missed."""
        pending = Pending(task_id, RESULT_PREFIX + task_id, self._ids.own(task_id))
        with self._lock:
            if self._closed:
                raise RuntimeError("the result waiter is closed")
            if self._thread is None:
                self._start()
            self._waiting[pending.key] = (threading.Event(), [])
            if not pending.own:
                self._pubsub.subscribe(pending.key)
        return pending

    def result(self, pending: Pending, timeout: float, *, read_first: bool = False) -> dict[str, Any]:
        """The final result meta; ``TimeoutError`` after ``timeout`` seconds. ``read_first``
        when the task may have finished before :meth:`expect`."""
        event, box = self._waiting[pending.key]
        try:
            deadline = time.monotonic() + timeout
            meta = _final(self._client.get(pending.key)) if read_first else None
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out(pending.task_id, timeout)
                meta = box[0] if event.wait(min(left, RECHECK_S)) else _final(self._client.get(pending.key))
            return meta
        finally:
            self.forget(pending)

    def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The final result meta of a task sent earlier."""
        return self.result(self.expect(task_id), timeout, read_first=True)

    def forget(self, pending: Pending) -> None:
        with self._lock:
            if self._waiting.pop(pending.key, None) is not None and not pending.own and not self._closed:
                self._pubsub.unsubscribe(pending.key)

    def _start(self) -> None:
        """Subscribe to the pattern and wait for Redis to confirm it, then start listening."""
        self._pubsub.psubscribe(self._ids.pattern)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=left)
            if message is not None and message.get("type") == "psubscribe":
                break
        else:
            raise redis.TimeoutError(f"Redis did not confirm the subscription to {self._ids.pattern}")
        self._thread = threading.Thread(target=self._listen, name="result-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed:
            try:
                message = self._pubsub.get_message(timeout=1.0)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.5)  # redis-py reconnects and resubscribes; waiters re-read meanwhile
                continue
            except Exception:
                if self._closed:
                    return
                raise
            key, meta = _result_message(message)
            waiter = self._waiting.get(key) if meta is not None else None
            if waiter is not None and not waiter[1]:
                waiter[1].append(meta)
                waiter[0].set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pubsub.close()


class AsyncResultWaiter:
    """The asyncio twin: one listener task on the event loop it was first used on."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._ids = _Ids()
        self._pubsub = client.pubsub()
        self._subscribed: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None

    def new_task_id(self) -> str:
        return self._ids.new()

    async def expect(self, task_id: str) -> Pending:
        key = RESULT_PREFIX + task_id
        pending = Pending(task_id, key, self._ids.own(task_id))
        if self._subscribed is None:  # the first caller subscribes; any others await it too
            self._subscribed = asyncio.ensure_future(self._subscribe_pattern())
        try:
            await asyncio.shield(self._subscribed)
        except BaseException:
            if self._subscribed.done():
                self._subscribed = None  # failed: the next caller tries again
            raise
        self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            if not pending.own:
                await self._pubsub.subscribe(key)
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen(), name="result-listener")
        except BaseException:
            await self.forget(pending)
            raise
        return pending

    async def result(self, pending: Pending, timeout: float, *, read_first: bool = False) -> dict[str, Any]:
        future = self._waiting[pending.key]
        try:
            deadline = time.monotonic() + timeout
            meta = _final(await self._client.get(pending.key)) if read_first else None
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out(pending.task_id, timeout)
                done, _ = await asyncio.wait({future}, timeout=min(left, RECHECK_S))
                meta = future.result() if done else _final(await self._client.get(pending.key))
            return meta
        finally:
            await self.forget(pending)

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        return await self.result(await self.expect(task_id), timeout, read_first=True)

    async def forget(self, pending: Pending) -> None:
        if self._waiting.pop(pending.key, None) is not None and not pending.own:
            await self._pubsub.unsubscribe(pending.key)

    async def _subscribe_pattern(self) -> None:
        await self._pubsub.psubscribe(self._ids.pattern)
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
            while True:
                message = await self._pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT_S)
                if message is not None and message.get("type") == "psubscribe":
                    return

    async def _listen(self) -> None:
        while self._waiting:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (redis.ConnectionError, redis.TimeoutError):
                await asyncio.sleep(0.5)
                continue
            key, meta = _result_message(message)
            future = self._waiting.get(key) if meta is not None else None
            if future is not None and not future.done():
                future.set_result(meta)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self._pubsub.aclose()
