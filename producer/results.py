"""Waiting for task results over one shared pub/sub connection per client.

Celery's Redis backend publishes every state it stores on the channel named after the
result key, ``celery-task-meta-<task id>``. A waiter subscribes to its task's channel; one
listener thread hands each final result to its waiter (a thread's event, or a coroutine's
future on its event loop). So a web app awaiting thousands of results holds one pub/sub
connection, not one per request.

Only one thread at a time uses that connection, save for the listener's wait for data,
which reads nothing: redis-py reconnects a pub/sub connection from whichever thread finds
it broken, and two handshakes at once on one connection read each other's replies (a
subscriber then gets the reply to a command it never sent).

``expect`` registers a waiter before its task is sent: then the result can only come
after the subscription, and no read of the key is needed. ``wait`` (a task sent earlier)
reads the key once after subscribing, in case the result came first. If a message is lost
(a reconnect), a waiter re-reads the key every ``RECHECK_S`` seconds. Through a Redis
outage a waiter goes on waiting (the listener reconnects and subscribes again, re-reads
that fail are tried again) until its result comes or its timeout passes.

Each task has a channel of its own rather than a pattern subscription per client: Redis
matches every PUBLISH (streamed tokens included) against every pattern subscribed on the
server, so patterns would tax the whole fleet by the number of producer processes. The
listener unsubscribes the channels whose results it delivered in one command, once it has
read everything that has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from wire.keys import RESULT_PREFIX

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RECHECK_S = 2.0
UNSUBSCRIBE_BATCH = 256


def _final(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        # a 384-float embedding: 19 us here against 153 us for json.loads
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:  # NaN or Infinity, which Celery's JSON writes
        meta = json.loads(raw)
    return meta if meta.get("status") in FINAL_STATES else None


def _result_message(message: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """(result key, final meta or None) of a pub/sub message."""
    if message is None or message.get("type") != "message":
        return "", None
    channel = message["channel"]
    key = channel.decode() if isinstance(channel, bytes) else channel
    return key, _final(message["data"])


@dataclass(frozen=True)
class Pending:
    """A registered waiter; its waiter's ``result`` collects it, once."""

    task_id: str
    key: str


def _timed_out(task_id: str, timeout: float, unreachable: BaseException | None = None) -> TimeoutError:
    why = f" (Redis unreachable: {unreachable})" if unreachable is not None else ""
    return TimeoutError(f"task {task_id}: no result within {timeout:.1f}s{why}")


class _Box:
    """A thread's slot for its result: the first final meta, and an event to wait on."""

    __slots__ = ("event", "meta")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.meta: dict[str, Any] | None = None

    @property
    def delivered(self) -> bool:
        return self.meta is not None

    def __call__(self, meta: dict[str, Any]) -> None:  # on the listener thread
        if self.meta is None:
            self.meta = meta
            self.event.set()


class _FutureBox:
    """A coroutine's slot: a future on its event loop, resolved from the listener thread."""

    __slots__ = ("delivered", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.delivered = False

    def _resolve(self, meta: dict[str, Any]) -> None:
        if not self.future.done():
            self.future.set_result(meta)

    def __call__(self, meta: dict[str, Any]) -> None:  # on the listener thread
        if not self.delivered:
            self.delivered = True
            with contextlib.suppress(RuntimeError):  # its loop has closed: no one waits
                self.loop.call_soon_threadsafe(self._resolve, meta)


class ResultWaiter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._lock = threading.Lock()  # every use of the pub/sub connection but the listener's wait
        self._waiting: dict[str, _Box | _FutureBox] = {}
        self._delivered: list[str] = []  # channels whose results were handed out, to unsubscribe
        self._thread: threading.Thread | None = None
        self._closed = False

    def expect(self, task_id: str, box: _Box | _FutureBox | None = None) -> Pending:
        """Subscribe to ``task_id``'s result; before sending it, so nothing is missed."""
        pending = Pending(task_id, RESULT_PREFIX + task_id)
        with self._lock:
            if self._closed:
                raise RuntimeError("the result waiter is closed")
            self._waiting[pending.key] = box or _Box()
            try:
                self._pubsub.subscribe(pending.key)
            except BaseException:
                del self._waiting[pending.key]  # Redis unreachable: the caller sees the error
                raise
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="result-listener", daemon=True)
                self._thread.start()
        return pending

    def result(self, pending: Pending, timeout: float, *, read_first: bool = False) -> dict[str, Any]:
        """The final result meta; ``TimeoutError`` after ``timeout`` seconds. ``read_first``
        when the task may have finished before :meth:`expect`."""
        box = self._waiting[pending.key]
        assert isinstance(box, _Box)
        unreachable: BaseException | None = None

        def read() -> dict[str, Any] | None:
            nonlocal unreachable
            try:
                meta, unreachable = _final(self._client.get(pending.key)), None
                return meta
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                unreachable = exc
                return None

        try:
            deadline = time.monotonic() + timeout
            meta = read() if read_first else None
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out(pending.task_id, timeout, unreachable)
                meta = box.meta if box.event.wait(min(left, RECHECK_S)) else read()
            return meta
        finally:
            self.forget(pending)

    def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The final result meta of a task sent earlier."""
        return self.result(self.expect(task_id), timeout, read_first=True)

    def forget(self, pending: Pending) -> None:
        """Stop waiting. A delivered result's channel is left to the listener to unsubscribe."""
        if self._drop(pending):
            self._unsubscribe(pending)

    def _drop(self, pending: Pending) -> bool:
        """Forget the waiter; True if its channel is still to unsubscribe."""
        # the usual case, a delivered result, takes no lock: the pop is atomic, and the
        # lock is held by pub/sub commands (a subscribe, the listener's batched unsubscribe)
        box = self._waiting.pop(pending.key, None)
        return box is not None and not box.delivered

    def _unsubscribe(self, pending: Pending) -> None:
        with self._lock:
            if not self._closed:
                # through an outage: a new connection subscribes only to the channels still waited on
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    self._pubsub.unsubscribe(pending.key)

    def _listen(self) -> None:
        more = False
        while not self._closed:
            if not more:
                self._wait_for_data(1.0)
            try:
                with self._lock:
                    if self._closed:
                        return
                    more = self._read_available()
            except (redis.ConnectionError, redis.TimeoutError):
                more = False
                time.sleep(0.5)  # Redis unreachable: waiters re-read meanwhile
            except Exception:
                more = False
                if self._closed:
                    return
                # keep listening: without the listener every result would wait for a re-read
                log.exception("result listener failed; listening again in 0.5 s")
                time.sleep(0.5)

    def _wait_for_data(self, timeout: float) -> None:
        """Block, holding no lock, until the pub/sub socket has something to read (or is gone):
        a subscribe never waits for a quiet connection, and only a lock holder reconnects."""
        connection = self._pubsub.connection
        sock = getattr(connection, "_sock", None)
        if sock is None:
            return  # disconnected: the read reconnects it, under the lock
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, unseen by select
        if pending is not None and pending():
            return
        with contextlib.suppress(OSError, ValueError):  # closed under us: read (and reconnect) at once
            select.select([sock], [], [], timeout)

    def _read_available(self) -> bool:
        """Hand out the messages that have arrived (reconnecting first if need be), up to a
        batch, then unsubscribe the delivered channels in one command. True if more wait."""
        delivered, more = self._delivered, True
        for _ in range(UNSUBSCRIBE_BATCH):
            key, meta = _result_message(self._pubsub.get_message(timeout=0))
            box = self._waiting.get(key) if meta is not None else None
            if box is not None and not box.delivered:
                box(meta)
                delivered.append(key)
            more = self._more_to_read()
            if not more:
                break
        if delivered:
            self._pubsub.unsubscribe(*delivered)
            delivered.clear()  # (kept through a failed unsubscribe, for the next read)
        return more

    def _more_to_read(self) -> bool:
        connection = self._pubsub.connection
        return connection is not None and connection.can_read(0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pubsub.close()


class AsyncResultWaiter:
    """The asyncio face of a :class:`ResultWaiter`: its coroutines' subscriptions ride on the
    shared waiter's one pub/sub connection and listener thread, which resolves each
    coroutine's future on its own event loop. So every event loop of a process, and every
    thread, shares one pub/sub connection, and only one thread ever reconnects it."""

    def __init__(self, client: aioredis.Redis, shared: ResultWaiter) -> None:
        self._client = client  # this event loop's connection, for the re-reads
        self._shared = shared

    async def expect(self, task_id: str) -> Pending:
        loop = asyncio.get_running_loop()
        box = _FutureBox(loop)
        # a subscribe that finds the connection down reconnects it: not on the event loop
        subscribing = loop.run_in_executor(None, self._shared.expect, task_id, box)
        try:
            return await asyncio.shield(subscribing)
        except asyncio.CancelledError:  # the subscribe goes on: forget it once it is done

            def forget(done: asyncio.Future[Pending]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._forget_soon(loop, done.result())

            subscribing.add_done_callback(forget)
            raise

    async def result(self, pending: Pending, timeout: float, *, read_first: bool = False) -> dict[str, Any]:
        box = self._shared._waiting[pending.key]
        assert isinstance(box, _FutureBox)
        unreachable: BaseException | None = None

        async def read() -> dict[str, Any] | None:
            nonlocal unreachable
            try:
                meta, unreachable = _final(await self._client.get(pending.key)), None
                return meta
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                unreachable = exc
                return None

        try:
            deadline = time.monotonic() + timeout
            meta = await read() if read_first else None
            while meta is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out(pending.task_id, timeout, unreachable)
                done, _ = await asyncio.wait({box.future}, timeout=min(left, RECHECK_S))
                meta = box.future.result() if done else await read()
            return meta
        finally:
            await self.forget(pending)

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        return await self.result(await self.expect(task_id), timeout, read_first=True)

    async def forget(self, pending: Pending) -> None:
        self._forget_soon(asyncio.get_running_loop(), pending)

    def _forget_soon(self, loop: asyncio.AbstractEventLoop, pending: Pending) -> None:
        """Forget now; an unsubscribe (rare: a result never came) goes to a thread, unawaited."""
        if self._shared._drop(pending):
            loop.run_in_executor(None, self._shared._unsubscribe, pending)

    async def close(self) -> None:
        """Nothing of its own to close: the shared waiter closes with its client."""
