"""Reading a generation's token stream (CONTRACT §4), sync and asyncio.

A reader subscribes to the pub/sub channel first, then replays the Redis Stream from
the start (or from the ``seq`` it resumes after), then follows the channel; ``seq``
numbers drop duplicates and expose gaps, which are filled from the Stream. So a reader
that subscribes late, or reconnects, still gets every message once, in order. The
Stream is also re-read whenever the channel is quiet for a while, so a lost pub/sub
message never stalls a reader.

A generation delivered again after its worker died goes on in the same stream with a
``reset`` message (``seq`` keeps growing; CONTRACT §4, v1.1): a reader that gathers text
drops what it has gathered when it sees one. :func:`stream_text` does that.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis

from wire.keys import STREAM_PREFIX

QUIET_S = 0.5  # re-read the Stream after this long without a channel message


class StreamTimeout(TimeoutError):
    """The stream did not end within the reader's timeout."""


class _Cursor:
    """Orders messages by ``seq``; remembers the Stream id to re-read from."""

    def __init__(self, after_seq: int) -> None:
        self.next_seq = after_seq + 1
        self.stream_id = "-"
        self.pending: dict[int, dict[str, Any]] = {}
        self.done = False

    def offer(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        seq = message.get("seq", -1)
        if seq >= self.next_seq:
            self.pending[seq] = message
        elif message.get("type") in ("end", "error"):
            self.done = True  # the stream ended at or before the seq the reader resumes after
            return []
        ready = []
        while self.next_seq in self.pending:
            msg = self.pending.pop(self.next_seq)
            ready.append(msg)
            self.next_seq += 1
            if msg.get("type") in ("end", "error"):
                self.done = True
                break
        return ready

    def offer_entries(self, entries: list[tuple[Any, dict[Any, Any]]]) -> list[dict[str, Any]]:
        out = []
        for entry_id, fields in entries:
            self.stream_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            data = fields.get(b"data", fields.get("data"))
            out.extend(self.offer(json.loads(data)))
        return out

    def after(self) -> str:
        return "-" if self.stream_id == "-" else "(" + self.stream_id


def stream_text(messages: list[dict[str, Any]]) -> str:
    """The text a stream's messages give: its tokens after the last ``reset``."""
    text: list[str] = []
    for message in messages:
        if message.get("type") == "reset":
            text.clear()
        elif message.get("type") == "token":
            text.append(message["text"])
    return "".join(text)


def read_stream(
    client: redis.Redis,
    task_id: str,
    *,
    after_seq: int = -1,
    timeout: float = 600.0,
    pubsub: Any = None,
) -> Iterator[dict[str, Any]]:
    """Every message of the task's stream after ``after_seq``, in order, ending with end/error."""
    key = STREAM_PREFIX + task_id
    cursor = _Cursor(after_seq)
    own = pubsub is None
    if own:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(key)
    deadline = time.monotonic() + timeout
    try:
        yield from cursor.offer_entries(client.xrange(key, min=cursor.after()))
        while not cursor.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout(f"stream {key}: no end within {timeout:.0f}s (last seq {cursor.next_seq - 1})")
            message = pubsub.get_message(timeout=min(QUIET_S, left))
            if message is not None and message.get("type") == "message":
                ready = cursor.offer(json.loads(message["data"]))
                yield from ready
                if cursor.pending and not ready:  # a gap: the Stream has what the channel lost
                    yield from cursor.offer_entries(client.xrange(key, min=cursor.after()))
            else:
                yield from cursor.offer_entries(client.xrange(key, min=cursor.after()))
    finally:
        if own:
            pubsub.close()


async def aread_stream(
    client: aioredis.Redis,
    task_id: str,
    *,
    after_seq: int = -1,
    timeout: float = 600.0,
    pubsub: Any = None,
) -> AsyncIterator[dict[str, Any]]:
    """The asyncio twin of :func:`read_stream`."""
    key = STREAM_PREFIX + task_id
    cursor = _Cursor(after_seq)
    own = pubsub is None
    if own:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(key)
    deadline = time.monotonic() + timeout
    try:
        for msg in cursor.offer_entries(await client.xrange(key, min=cursor.after())):
            yield msg
        while not cursor.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout(f"stream {key}: no end within {timeout:.0f}s (last seq {cursor.next_seq - 1})")
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(QUIET_S, left))
            ready: list[dict[str, Any]] = []
            if message is not None and message.get("type") == "message":
                ready = cursor.offer(json.loads(message["data"]))
                if cursor.pending and not ready:
                    ready += cursor.offer_entries(await client.xrange(key, min=cursor.after()))
            else:
                ready = cursor.offer_entries(await client.xrange(key, min=cursor.after()))
            for msg in ready:
                yield msg
    finally:
        if own:
            await pubsub.aclose()
