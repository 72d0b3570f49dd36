"""The worker's stream publisher against a real Redis: order, completeness, expiry, failures."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
import redis

from worker.streams import STREAM_PREFIX, StreamPublisher


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stream-")]


def test_every_message_in_order_on_the_stream_and_the_channel(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    task_id = f"test-{uuid.uuid4()}"
    key = STREAM_PREFIX + task_id
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(key)
    try:
        publisher = StreamPublisher(client, task_id, ttl=120)
        pieces = [f"piece {i} é " for i in range(300)]  # faster than one round trip each: batched writes
        for piece in pieces:
            publisher.token(piece)
        publisher.end("length", {"prompt_tokens": 3, "completion_tokens": 300, "total_tokens": 303})

        # end() returns only once everything is in Redis
        entries = [json.loads(fields[b"data"]) for _, fields in client.xrange(key)]
        assert [m["seq"] for m in entries] == list(range(301))
        assert [m["text"] for m in entries[:-1]] == pieces
        assert entries[-1]["type"] == "end" and entries[-1]["finish_reason"] == "length"
        assert 0 < client.ttl(key) <= 120

        received = []
        deadline = time.monotonic() + 10
        while len(received) < 301 and time.monotonic() < deadline:
            message = listener.get_message(timeout=1.0)
            if message is not None:
                received.append(json.loads(message["data"]))
        assert received == entries

        with pytest.raises(RuntimeError, match="already ended"):
            publisher.token("late")
        for thread in _stream_threads():
            thread.join(timeout=5)
        assert not [t for t in _stream_threads() if task_id in t.name], "the writer thread outlived its stream"
    finally:
        listener.close()
        client.delete(key)


def test_a_failed_write_is_raised_to_the_generation(redis_url: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    publisher = StreamPublisher(dead, f"test-{uuid.uuid4()}", ttl=60)
    publisher.write_retry_s = 1.0  # it rides out an outage this long before it gives up
    publisher.token("queued without waiting for Redis")  # returns at once; the writer fails
    deadline = time.monotonic() + 10
    while publisher._failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="write failed"):
        publisher.token("the next piece hears of it")
    with pytest.raises(RuntimeError, match="write failed"):
        publisher.end("stop", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    publisher.error("InferenceError", "best effort: logged, not raised over the task's own error")


def test_end_raises_a_failure_that_happens_while_flushing(redis_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    publisher = StreamPublisher(dead, f"test-{uuid.uuid4()}", ttl=60)
    publisher.write_retry_s = 1.0
    with pytest.raises(RuntimeError, match="write failed"):
        publisher.end("stop", {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1})
    assert publisher.closed
