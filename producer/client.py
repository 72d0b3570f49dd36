"""Send tasks by name over the Celery protocol and wait for results in Redis.

Results are awaited over one shared pub/sub connection per client (producer/results.py):
no polling, and no connection per waiting request. The same client serves synchronous
callers and asyncio ones (``await client.aembed(...)`` in a FastAPI handler).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from producer.broker import transport_for
from producer.results import AsyncResultWaiter, ResultWaiter
from producer.streams import aread_stream, read_stream
from wire import connect
from wire.encode import origin, task_message
from wire.errors import InferenceError, InvalidRequest, Overloaded, TimeLimitReached, TransientError, WorkerError
from wire.keys import CANCEL_PREFIX, STREAM_PREFIX
from wire.limits import TIME_LIMITS

_KNOWN_ERRORS: dict[str, type[Exception]] = {
    "InvalidRequest": InvalidRequest,
    "InferenceError": InferenceError,
    "TransientError": TransientError,
    "Overloaded": Overloaded,
    "TimeLimitReached": TimeLimitReached,
}
DEFAULT_TIMEOUTS = dict(TIME_LIMITS)  # a producer waits as long as its task may run


class TaskFailed(WorkerError):
    """A task failed with an error outside the contract's tree (for example a time limit)."""

    def __init__(self, message: str, exc_type: str = "") -> None:
        super().__init__(message)
        self.exc_type = exc_type


def decode_result(meta: dict[str, Any]) -> dict[str, Any]:
    """The task's result, or its error raised as the contract's exception type."""
    status = meta.get("status")
    if status == "SUCCESS":
        return meta["result"]
    error = meta.get("result") or {}
    exc_type = error.get("exc_type", status or "unknown")
    message = error.get("exc_message", "")
    if isinstance(message, list | tuple):
        message = message[0] if len(message) == 1 else ", ".join(map(str, message))
    cls = _KNOWN_ERRORS.get(exc_type)
    if cls is not None:
        raise cls(str(message))
    raise TaskFailed(f"{exc_type}: {message}", exc_type)


@dataclass
class _AsyncSide:
    redis: aioredis.Redis
    waiter: AsyncResultWaiter | None = None


class InferenceClient:
    """One per process; thread-safe for sending, cheap to share."""

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379/0",
        timeouts: dict[str, float] | None = None,
        *,
        send_via_celery: bool = False,
        master_name: str | None = None,
    ) -> None:
        """``send_via_celery``: send with Celery's ``send_task`` even on a Redis broker, so
        that its publish signals run (``before_task_publish``: tracing instrumentation, for
        example) at about 0.5 ms more CPU per send."""
        self.redis_url = redis_url
        self.master_name = master_name  # with a sentinel:// URL: the master the sentinels watch
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        # no Celery result backend here: results are awaited by our own waiter below. With
        # one, every send_task would also subscribe Celery's own result consumer to the
        # task's channel (a second SUBSCRIBE/UNSUBSCRIBE per task, a second copy of every
        # result published, and a backend connection per sending thread)
        self.celery = Celery("producer", broker=redis_url, backend="disabled", set_as_current=False)
        self.celery.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            broker_connection_retry_on_startup=True,
        )
        if master_name:
            self.celery.conf.broker_transport_options = {"master_name": master_name}
        # on a plain Redis broker the client writes the task message itself, one LPUSH
        # (wire/encode.py); other broker URLs (Sentinel, sockets) send through Celery
        transport = transport_for(redis_url)
        self._direct = transport is not None and not send_via_celery
        if transport:
            self.celery.conf.broker_transport = transport  # one Redis client for all sends
        self._reply_to = str(uuid.uuid4())
        self._redis = connect.client(redis_url, master_name)
        self._waiter = ResultWaiter(self._redis)
        # the asyncio side, one per event loop: redis-py's asyncio connections (and the
        # waiter's listener task) belong to the loop they were made on
        self._async: dict[asyncio.AbstractEventLoop, _AsyncSide] = {}

    # -- sending ------------------------------------------------------------------------

    def send(
        self, task: str, *, model: str, queue: str | None = None, task_id: str | None = None, **kwargs: Any
    ) -> str:
        """Enqueue ``task`` for ``model`` on its queue (by default the alias); returns the task id."""
        if not self._direct:
            task_id = task_id or str(uuid.uuid4())
            self.celery.send_task(task, kwargs={"model": model, **kwargs}, queue=queue or model, task_id=task_id)
            return task_id
        queue, task_id, message = self._message(task, model, queue, task_id, kwargs)
        self._redis.lpush(queue, message)
        return task_id

    async def asend(
        self, task: str, *, model: str, queue: str | None = None, task_id: str | None = None, **kwargs: Any
    ) -> str:
        if not self._direct:  # Celery's send blocks on the broker
            return await asyncio.to_thread(self.send, task, model=model, queue=queue, task_id=task_id, **kwargs)
        queue, task_id, message = self._message(task, model, queue, task_id, kwargs)
        await self._async_redis().lpush(queue, message)
        return task_id

    def _message(
        self, task: str, model: str, queue: str | None, task_id: str | None, kwargs: dict[str, Any]
    ) -> tuple[str, str, bytes]:
        """(queue, task id, the message to push on the queue's list)."""
        queue, task_id = queue or model, task_id or str(uuid.uuid4())
        kwargs = {"model": model, **kwargs}
        return queue, task_id, task_message(task, task_id, kwargs, queue, sender=origin(), reply_to=self._reply_to)

    # -- waiting ------------------------------------------------------------------------

    def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The task's result, or its error raised as the contract's type."""
        return decode_result(self._waiter.wait(task_id, timeout))

    async def await_result(self, task_id: str, timeout: float) -> dict[str, Any]:
        return decode_result(await self._async_waiter().wait(task_id, timeout))

    def call(
        self, task: str, *, model: str, timeout: float | None = None, queue: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Send and wait: the waiter subscribes first, so the result needs no read."""
        pending = self._waiter.expect(str(uuid.uuid4()))
        try:
            self.send(task, model=model, queue=queue, task_id=pending.task_id, **kwargs)
        except BaseException:
            self._waiter.forget(pending)
            raise
        return decode_result(self._waiter.result(pending, timeout or self.timeouts.get(task, 60.0)))

    async def acall(
        self, task: str, *, model: str, timeout: float | None = None, queue: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        waiter = self._async_waiter()
        pending = await waiter.expect(str(uuid.uuid4()))
        try:
            await self.asend(task, model=model, queue=queue, task_id=pending.task_id, **kwargs)
        except BaseException:
            await waiter.forget(pending)
            raise
        return decode_result(await waiter.result(pending, timeout or self.timeouts.get(task, 60.0)))

    # -- the tasks, by name -------------------------------------------------------------

    def embed(self, model: str, input: str | list[str], normalize: bool = True, **opts: Any) -> dict[str, Any]:
        return self.call("embed", model=model, input=input, normalize=normalize, **opts)

    async def aembed(self, model: str, input: str | list[str], normalize: bool = True, **opts: Any) -> dict[str, Any]:
        return await self.acall("embed", model=model, input=input, normalize=normalize, **opts)

    def rerank(self, model: str, query: str, documents: list[str], **opts: Any) -> dict[str, Any]:
        return self.call("rerank", model=model, query=query, documents=documents, **opts)

    async def arerank(self, model: str, query: str, documents: list[str], **opts: Any) -> dict[str, Any]:
        return await self.acall("rerank", model=model, query=query, documents=documents, **opts)

    def ner(self, model: str, input: str | list[str], **opts: Any) -> dict[str, Any]:
        return self.call("ner", model=model, input=input, **opts)

    async def aner(self, model: str, input: str | list[str], **opts: Any) -> dict[str, Any]:
        return await self.acall("ner", model=model, input=input, **opts)

    def classify(self, model: str, input: str | list[str], **opts: Any) -> dict[str, Any]:
        return self.call("classify", model=model, input=input, **opts)

    async def aclassify(self, model: str, input: str | list[str], **opts: Any) -> dict[str, Any]:
        return await self.acall("classify", model=model, input=input, **opts)

    def generate(self, model: str, **opts: Any) -> dict[str, Any]:
        return self.call("generate", model=model, **opts)

    async def agenerate(self, model: str, **opts: Any) -> dict[str, Any]:
        return await self.acall("generate", model=model, **opts)

    # -- streaming and cancellation -----------------------------------------------------

    def stream_generate(
        self,
        model: str,
        *,
        queue: str | None = None,
        timeout: float | None = None,
        task_id: str | None = None,
        **opts: Any,
    ) -> Iterator[dict[str, Any]]:
        """Send ``generate(stream=True)`` and yield its stream messages (token..., end|error).

        Subscribes before sending, so nothing is missed; the task id is in every message.
        """
        task_id = task_id or str(uuid.uuid4())
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(STREAM_PREFIX + task_id)
        try:
            self.send("generate", model=model, queue=queue, task_id=task_id, stream=True, **opts)
            yield from read_stream(self._redis, task_id, timeout=timeout or self.timeouts["generate"], pubsub=pubsub)
        finally:
            pubsub.close()

    async def astream_generate(
        self,
        model: str,
        *,
        queue: str | None = None,
        timeout: float | None = None,
        task_id: str | None = None,
        **opts: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        task_id = task_id or str(uuid.uuid4())
        client = self._async_redis()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(STREAM_PREFIX + task_id)
        try:
            await self.asend("generate", model=model, queue=queue, task_id=task_id, stream=True, **opts)
            async for message in aread_stream(
                client, task_id, timeout=timeout or self.timeouts["generate"], pubsub=pubsub
            ):
                yield message
        finally:
            await pubsub.aclose()

    def read_stream(self, task_id: str, after_seq: int = -1, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Replay and follow a stream, for a reader that came late or reconnects."""
        return read_stream(self._redis, task_id, after_seq=after_seq, timeout=timeout or self.timeouts["generate"])

    async def aread_stream(
        self, task_id: str, after_seq: int = -1, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        async for message in aread_stream(
            self._async_redis(), task_id, after_seq=after_seq, timeout=timeout or self.timeouts["generate"]
        ):
            yield message

    def cancel(self, task_id: str, ttl: int = 3600) -> None:
        """Stop a running generation (or keep a queued one from starting): CONTRACT §5."""
        self._redis.set(CANCEL_PREFIX + task_id, "1", ex=ttl)
        self.celery.control.revoke(task_id)

    async def acancel(self, task_id: str, ttl: int = 3600) -> None:
        await self._async_redis().set(CANCEL_PREFIX + task_id, "1", ex=ttl)
        await asyncio.to_thread(self.celery.control.revoke, task_id)

    def _async_side(self) -> _AsyncSide:
        loop = asyncio.get_running_loop()
        side = self._async.get(loop)
        if side is None:
            # a loop closed without aclose() (a script's second asyncio.run, a test's own
            # loop): its connections can no longer be closed from a loop, so let them go
            for old in [old for old in self._async if old.is_closed()]:
                del self._async[old]
            side = self._async[loop] = _AsyncSide(connect.async_client(self.redis_url, self.master_name))
        return side

    def _async_waiter(self) -> AsyncResultWaiter:
        side = self._async_side()
        if side.waiter is None:
            side.waiter = AsyncResultWaiter(side.redis, self._waiter)
        return side.waiter

    def _async_redis(self) -> aioredis.Redis:
        return self._async_side().redis

    def close(self) -> None:
        self._waiter.close()
        self._redis.close()
        self.celery.close()

    async def aclose(self) -> None:
        """Close every connection: the running event loop's asyncio ones, then the rest.
        (Another loop's asyncio connections go with that loop.)"""
        side = self._async.pop(asyncio.get_running_loop(), None)
        if side is not None:
            if side.waiter is not None:
                await side.waiter.close()
            await side.redis.aclose()
        self.close()
