"""Waiting for task results over one shared pub/sub connection per client.

Celery's Redis backend publishes every state it stores (STARTED, then the result) on the
channel named after the result key. A waiter subscribes to that channel, then reads the
key once in case the result was stored before the subscription; a single listener (a
thread, or a task per event loop) hands each final result to its waiter. So a web app
awaiting thousands of results holds one pub/sub connection, not one per request. If a
message is lost (a reconnect), the waiter re-reads the key every ``RECHECK_S`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import redis
import redis.asyncio as aioredis

RESULT_PREFIX = "celery-task-meta-"
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RECHECK_S = 2.0


def _final(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    meta = json.loads(raw)
    return meta if meta.get("status") in FINAL_STATES else None


def _result_message(message: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """(result key, final meta or None) of a pub/sub message."""
    if message is None or message.get("type") != "message":
        return "", None
    channel = message["channel"]
    key = channel.decode() if isinstance(channel, bytes) else channel
    return key, _final(message["data"])


class ResultWaiter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The final result meta of ``task_id``; TimeoutError after ``timeout`` seconds."""
        key = RESULT_PREFIX + task_id
        event, box = threading.Event(), []
        with self._lock:
            self._waiting[key] = (event, box)
            self._pubsub.subscribe(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="result-listener", daemon=True)
                self._thread.start()
        try:
            deadline = time.monotonic() + timeout
            meta = _final(self._client.get(key))
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"task {task_id}: no result within {timeout:.1f}s")
                meta = box[0] if event.wait(min(left, RECHECK_S)) else _final(self._client.get(key))
            return meta
        finally:
            with self._lock:
                self._waiting.pop(key, None)
                if not self._closed:
                    self._pubsub.unsubscribe(key)

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
            if waiter is not None:
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
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        key = RESULT_PREFIX + task_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            await self._pubsub.subscribe(key)
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen(), name="result-listener")
            deadline = time.monotonic() + timeout
            meta = _final(await self._client.get(key))
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"task {task_id}: no result within {timeout:.1f}s")
                done, _ = await asyncio.wait({future}, timeout=min(left, RECHECK_S))
                meta = future.result() if done else _final(await self._client.get(key))
            return meta
        finally:
            self._waiting.pop(key, None)
            await self._pubsub.unsubscribe(key)

    async def _listen(self) -> None:
        while self._waiting:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
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
