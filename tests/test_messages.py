"""The producer client writes its task messages itself (wire/encode.py). The oracle
is Celery: for the same task id, what ``send_task`` stores on the queue's Redis list must
be what the client stores, field by field. The workers that consume these messages are
exercised by every test that sends through ``InferenceClient`` (Celery's consumer in
test_generate.py, the bulk intake in test_embed.py and test_example_webapp.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import socket
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish

from producer import InferenceClient
from wire.encode import origin, task_message

# differ between any two sends, whoever makes them
PER_SEND = ("delivery_tag", "reply_to")

KWARGS: list[dict[str, Any]] = [
    {"model": "minilm", "input": "hello"},
    {"model": "minilm", "input": ["naïve café — 東京", "  extra   spaces  ", "\u2028", ""], "normalize": False},
    {"model": "rr", "query": "q", "documents": ["d" * 5000] * 3, "top_n": 2, "return_documents": True},
    {
        "model": "lm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 3,
        "stream": True,
        "logit_bias": None,
    },
    {"model": "m", "input": "x", "big": 2**70, "price": Decimal("1.10"), "by_id": {1: "a"}},
]


def decoded(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for key in PER_SEND:
        message["properties"].pop(key)
    return message


@pytest.fixture(scope="module")
def celery_producer(redis_url: str) -> Celery:
    app = Celery("oracle", broker=redis_url, backend="disabled", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    yield app
    app.close()


@pytest.mark.parametrize("kwargs", KWARGS, ids=["embed", "unicode", "rerank", "generate", "odd-types"])
def test_client_message_is_celerys(
    kwargs: dict[str, Any], celery_producer: Celery, redis_client: redis.Redis, redis_url: str
) -> None:
    queue = f"test-messages-{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())
    client = InferenceClient(redis_url)
    try:
        assert client._direct
        celery_producer.send_task("embed", kwargs=kwargs, queue=queue, task_id=task_id)
        client.send("embed", queue=queue, task_id=task_id, **kwargs)
        # LPUSH puts the newest first; a worker takes from the other end
        ours, celerys = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)
        client.close()
    celerys_message = decoded(celerys)
    ours_message = decoded(ours)
    # the one header Celery's lack: the send time, for the worker's time-in-queue metric
    sent_at = ours_message["headers"].pop("sent_at")
    assert isinstance(sent_at, float) and abs(time.time() - sent_at) < 60
    assert ours_message == celerys_message


def test_async_send_writes_the_same_message(redis_client: redis.Redis, redis_url: str) -> None:
    queue = f"test-messages-{uuid.uuid4().hex[:8]}"
    kwargs = KWARGS[1]

    async def main() -> str:
        client = InferenceClient(redis_url)
        try:
            return await client.asend("embed", queue=queue, **kwargs)
        finally:
            await client.aclose()

    task_id = asyncio.run(main())
    try:
        (raw,) = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)
    expected = task_message("embed", task_id, kwargs, queue, sender="s", reply_to="r")
    got = decoded(raw)
    want = decoded(expected)
    got["headers"].pop("origin"), want["headers"].pop("origin")
    got["headers"].pop("sent_at"), want["headers"].pop("sent_at")
    assert got == want
    assert got["headers"]["id"] == task_id and got["properties"]["delivery_info"]["routing_key"] == queue


def test_each_message_has_its_own_delivery_tag() -> None:
    one = json.loads(task_message("embed", "t", {"model": "m"}, "q", sender="s", reply_to="r"))
    two = json.loads(task_message("embed", "t", {"model": "m"}, "q", sender="s", reply_to="r"))
    assert one["properties"]["delivery_tag"] != two["properties"]["delivery_tag"]


def _child_origin(_: int) -> tuple[int, str]:
    return os.getpid(), origin()


def test_the_origin_header_names_the_sending_process_also_after_a_fork() -> None:
    parent = origin()  # cached in this process before the fork
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pid, child = pool.map(_child_origin, [0])[0]
    assert parent == f"gen{os.getpid()}@{socket.gethostname()}"
    assert child == f"gen{pid}@{socket.gethostname()}" != parent


def test_send_via_celery_runs_celerys_publish_signals(redis_client: redis.Redis, redis_url: str) -> None:
    """For instrumentation that hooks ``before_task_publish`` (tracing): the option sends
    through ``send_task``; the default does not."""
    queue = f"test-messages-{uuid.uuid4().hex[:8]}"
    published: list[str] = []

    def seen(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append((headers or {}).get("id"))

    before_task_publish.connect(seen, weak=False)
    sent = {}
    try:
        for via_celery in (False, True):
            client = InferenceClient(redis_url, send_via_celery=via_celery)
            try:
                sent[via_celery] = client.send("embed", model="m", queue=queue, input="x")
            finally:
                client.close()
        assert redis_client.llen(queue) == 2
    finally:
        before_task_publish.disconnect(seen)
        redis_client.delete(queue)
    assert published == [sent[True]]
