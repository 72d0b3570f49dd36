"""The producer's result waiters against a real Redis. Results are stored as Celery's Redis
backend stores them (SET the key, then PUBLISH on the key's channel); no worker needed."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from producer.results import RECHECK_S, RESULT_PREFIX, AsyncResultWaiter, ResultWaiter

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def store(
    r: redis.Redis,
    task_id: str,
    status: str = "SUCCESS",
    result: Any = None,
    *,
    keep: bool = True,
    publish: bool = True,
) -> None:
    """``keep=False``: only published, so only a subscriber can see it (no re-read can)."""
    key = RESULT_PREFIX + task_id
    value = json.dumps({"status": status, "result": result, "task_id": task_id})
    if keep:
        r.set(key, value, ex=60)
    if publish:
        r.publish(key, value)


def subscribers(r: redis.Redis, task_id: str) -> int:
    return dict(r.pubsub_numsub(RESULT_PREFIX + task_id)).get((RESULT_PREFIX + task_id).encode(), 0)


def later(delay: float, fn: Any, *args: Any, **kwargs: Any) -> threading.Timer:
    timer = threading.Timer(delay, fn, args, kwargs)
    timer.start()
    return timer


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def waiter(redis_url: str) -> Iterator[ResultWaiter]:
    client = redis.Redis.from_url(redis_url)
    w = ResultWaiter(client)
    yield w
    w.close()
    client.close()


def test_own_ids_are_uuids_whose_results_need_no_subscription_of_their_own(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    ids = [waiter.new_task_id() for _ in range(100)]
    assert all(UUID4.match(i) for i in ids) and len(set(ids)) == 100
    assert len({i[:8] for i in ids}) == 1  # one prefix per waiter
    assert ResultWaiter(r).new_task_id()[:8] != ids[0][:8]

    pending = waiter.expect(ids[0])
    assert subscribers(r, ids[0]) == 0  # the pattern covers it
    later(0.1, store, r, ids[0], result={"n": 1}, keep=False)
    assert waiter.result(pending, timeout=10)["result"] == {"n": 1}


def test_an_id_chosen_by_the_caller_gets_a_channel_for_as_long_as_it_waits(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    task_id = str(uuid.uuid4())
    later(0.3, store, r, task_id, result="theirs", keep=False)
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(waiter.wait(task_id, timeout=10)))
    thread.start()
    deadline = time.monotonic() + 5
    while subscribers(r, task_id) == 0 and not done:
        assert time.monotonic() < deadline, "no subscription while waiting"
        time.sleep(0.01)
    thread.join(10)
    assert done and done[0]["result"] == "theirs"
    assert subscribers(r, task_id) == 0


def test_a_result_stored_before_the_wait_is_read_and_states_before_the_last_are_skipped(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    early = waiter.new_task_id()
    store(r, early, result="early")
    assert waiter.wait(early, timeout=5)["result"] == "early"

    task_id = waiter.new_task_id()
    pending = waiter.expect(task_id)
    store(r, task_id, status="STARTED")
    later(0.2, store, r, task_id, status="FAILURE", result={"exc_type": "InvalidRequest"})
    assert waiter.result(pending, timeout=10)["status"] == "FAILURE"


def test_a_lost_message_is_found_by_reading_the_key_again(r: redis.Redis, waiter: ResultWaiter) -> None:
    task_id = waiter.new_task_id()
    pending = waiter.expect(task_id)
    later(0.1, store, r, task_id, result="quiet", publish=False)
    started = time.monotonic()
    assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == "quiet"
    assert time.monotonic() - started < RECHECK_S * 2


def test_no_result_is_a_timeout_and_leaves_nothing_behind(r: redis.Redis, waiter: ResultWaiter) -> None:
    for task_id in (waiter.new_task_id(), str(uuid.uuid4())):
        with pytest.raises(TimeoutError, match=task_id):
            waiter.wait(task_id, timeout=0.3)
        assert subscribers(r, task_id) == 0
    assert not waiter._waiting


def test_many_threads_each_get_their_own_result(r: redis.Redis, waiter: ResultWaiter) -> None:
    ids = [waiter.new_task_id() for _ in range(64)] + [str(uuid.uuid4()) for _ in range(16)]
    pending = {task_id: waiter.expect(task_id) for task_id in ids}
    with ThreadPoolExecutor(len(ids)) as pool:
        futures = {task_id: pool.submit(waiter.result, pending[task_id], 20.0) for task_id in ids}
        for task_id in reversed(ids):
            store(r, task_id, result=task_id, keep=False)
        assert all(f.result(timeout=30)["result"] == task_id for task_id, f in futures.items())
    assert not waiter._waiting


def test_results_keep_coming_after_the_pubsub_connection_is_dropped(r: redis.Redis, waiter: ResultWaiter) -> None:
    first = waiter.new_task_id()
    pending = waiter.expect(first)
    store(r, first, result=1)
    assert waiter.result(pending, timeout=10)["result"] == 1
    host, port = waiter._pubsub.connection._sock.getsockname()[:2]
    assert r.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1

    second = waiter.new_task_id()
    pending = waiter.expect(second)
    started = time.monotonic()
    later(0.1, store, r, second, result=2)
    assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == 2
    assert time.monotonic() - started < RECHECK_S * 2

    third = waiter.new_task_id()  # only published: it arrives once the pattern is subscribed again
    pending = waiter.expect(third)
    deadline = time.monotonic() + 10
    while True:
        store(r, third, result=3, keep=False)
        try:
            assert waiter.result(pending, timeout=0.2)["result"] == 3
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the pattern was not subscribed again"
            pending = waiter.expect(third)


def test_the_async_waiter_serves_its_own_ids_and_the_callers(redis_url: str, r: redis.Redis) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        waiter = AsyncResultWaiter(client)
        try:
            own = [waiter.new_task_id() for _ in range(40)]
            theirs = [str(uuid.uuid4()) for _ in range(8)]
            assert all(UUID4.match(i) for i in own)
            pending = [await waiter.expect(task_id) for task_id in own]
            assert all(subscribers(r, task_id) == 0 for task_id in own)
            store(r, theirs[0], result=theirs[0])  # before anyone waits: read from the key

            async def wait_theirs(task_id: str) -> Any:
                return (await waiter.wait(task_id, timeout=20))["result"]

            waits = [asyncio.ensure_future(waiter.result(p, timeout=20)) for p in pending]
            waits += [asyncio.ensure_future(wait_theirs(t)) for t in theirs]
            await asyncio.sleep(0.2)
            for task_id in own + theirs[1:]:
                store(r, task_id, result=task_id, keep=False)
            results = await asyncio.wait_for(asyncio.gather(*waits), 30)
            assert [m["result"] for m in results[: len(own)]] == own
            assert results[len(own) :] == theirs
            assert not waiter._waiting and all(subscribers(r, t) == 0 for t in theirs)
            with pytest.raises(TimeoutError):
                await waiter.wait(waiter.new_task_id(), timeout=0.2)
        finally:
            await waiter.close()
            await client.aclose()

    asyncio.run(scenario())
