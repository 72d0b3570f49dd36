"""The producer's result waiters against a real Redis. Results are stored as Celery's Redis
backend stores them (SET the key, then PUBLISH on the key's channel); no worker needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from producer.results import RECHECK_S, RESULT_PREFIX, AsyncResultWaiter, ResultWaiter


def store(
    r: redis.Redis,
    task_id: str,
    status: str = "SUCCESS",
    result: Any = None,
    *,
    keep: bool = True,
    publish: bool = True,
) -> None:
    """``keep=False``: only published, so only a subscriber can see it (no read can)."""
    key = RESULT_PREFIX + task_id
    value = json.dumps({"status": status, "result": result, "task_id": task_id})
    if keep:
        r.set(key, value, ex=60)
    if publish:
        r.publish(key, value)


def subscribers(r: redis.Redis, task_id: str) -> int:
    key = RESULT_PREFIX + task_id
    return dict(r.pubsub_numsub(key)).get(key.encode(), 0)


def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def later(delay: float, fn: Any, *args: Any, **kwargs: Any) -> None:
    threading.Timer(delay, fn, args, kwargs).start()


def unsubscribe_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_unsubscribe", {}).get("calls", 0))


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


@contextlib.asynccontextmanager
async def async_waiter(
    redis_url: str, name: str | None = None
) -> AsyncIterator[tuple[AsyncResultWaiter, ResultWaiter]]:
    """An asyncio waiter on its shared waiter, as a client makes them (``name``: the shared
    waiter's connections' client name)."""
    client = aioredis.Redis.from_url(redis_url)
    shared_client = redis.Redis.from_url(redis_url, client_name=name)
    shared = ResultWaiter(shared_client)
    waiter = AsyncResultWaiter(client, shared)
    try:
        yield waiter, shared
    finally:
        await waiter.close()
        shared.close()
        shared_client.close()
        await client.aclose()


def test_a_waiter_registered_before_the_send_needs_only_the_published_result(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    task_id = str(uuid.uuid4())
    pending = waiter.expect(task_id)
    assert subscribers(r, task_id) == 1
    later(0.1, store, r, task_id, result={"n": 1}, keep=False)
    assert waiter.result(pending, timeout=10)["result"] == {"n": 1}
    eventually(lambda: subscribers(r, task_id) == 0, "the channel was not unsubscribed after the result")


def test_a_result_stored_before_the_wait_is_read_and_states_before_the_last_are_skipped(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    early = str(uuid.uuid4())
    store(r, early, result="early")
    assert waiter.wait(early, timeout=5)["result"] == "early"

    task_id = str(uuid.uuid4())
    pending = waiter.expect(task_id)
    store(r, task_id, status="STARTED")
    later(0.2, store, r, task_id, status="FAILURE", result={"exc_type": "InvalidRequest"}, keep=False)
    assert waiter.result(pending, timeout=10)["status"] == "FAILURE"
    eventually(lambda: subscribers(r, early) + subscribers(r, task_id) == 0, "channels left subscribed")


def test_results_in_any_json_celery_writes_are_read(r: redis.Redis, waiter: ResultWaiter) -> None:
    """Celery's JSON writes a float NaN or infinity as the bare words, which strict JSON
    parsers refuse; a result holding one still arrives, published or stored."""
    result = {"scores": [float("nan"), float("inf"), -0.5], "text": "naïve 東京"}
    published, stored = str(uuid.uuid4()), str(uuid.uuid4())
    pending = waiter.expect(published)
    later(0.1, store, r, published, result=result, keep=False)
    store(r, stored, result=result)
    for got in (waiter.result(pending, timeout=10)["result"], waiter.wait(stored, timeout=10)["result"]):
        nan, inf, rest = got["scores"]
        assert nan != nan and inf == float("inf") and rest == -0.5
        assert got["text"] == result["text"]


def test_a_lost_message_is_found_by_reading_the_key_again(r: redis.Redis, waiter: ResultWaiter) -> None:
    task_id = str(uuid.uuid4())
    pending = waiter.expect(task_id)
    later(0.1, store, r, task_id, result="quiet", publish=False)
    started = time.monotonic()
    assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == "quiet"
    assert time.monotonic() - started < RECHECK_S * 2
    assert subscribers(r, task_id) == 0


def test_no_result_is_a_timeout_and_leaves_nothing_behind(r: redis.Redis, waiter: ResultWaiter) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(TimeoutError, match=task_id):
        waiter.wait(task_id, timeout=0.3)
    assert subscribers(r, task_id) == 0
    assert not waiter._waiting


def test_many_threads_each_get_their_own_result_and_the_channels_go_in_few_commands(
    r: redis.Redis, waiter: ResultWaiter
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(80)]
    pending = {task_id: waiter.expect(task_id) for task_id in ids}
    before = unsubscribe_calls(r)
    with ThreadPoolExecutor(len(ids)) as pool:
        futures = {task_id: pool.submit(waiter.result, pending[task_id], 20.0) for task_id in ids}
        with r.pipeline(transaction=False) as pipe:
            for task_id in reversed(ids):
                store(pipe, task_id, result=task_id, keep=False)
            pipe.execute()
        assert all(f.result(timeout=30)["result"] == task_id for task_id, f in futures.items())
    assert not waiter._waiting
    eventually(lambda: sum(subscribers(r, t) for t in ids) == 0, "channels left subscribed")
    assert unsubscribe_calls(r) - before < len(ids) / 2  # the listener unsubscribes in batches


def test_results_keep_coming_after_the_pubsub_connection_is_dropped(r: redis.Redis, waiter: ResultWaiter) -> None:
    waiting = str(uuid.uuid4())
    pending = waiter.expect(waiting)
    host, port = waiter._pubsub.connection._sock.getsockname()[:2]
    assert r.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
    store(r, waiting, result=1)  # published while no one listens: found by a read, or resubscribed
    assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == 1

    after = str(uuid.uuid4())  # only published: the listener reads the new connection
    pending = waiter.expect(after)
    eventually(lambda: subscribers(r, after) == 1, "not subscribed again", timeout=10)
    store(r, after, result=2, keep=False)
    assert waiter.result(pending, timeout=10)["result"] == 2


def test_the_listener_outlives_an_unexpected_error(
    r: redis.Redis, waiter: ResultWaiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = str(uuid.uuid4())
    pending = waiter.expect(first)  # the listener runs
    real, raised = waiter._pubsub.get_message, threading.Event()

    def failing_once(**kwargs: Any) -> Any:
        if not raised.is_set():
            raised.set()
            raise ValueError("a parser bug")
        return real(**kwargs)

    monkeypatch.setattr(waiter._pubsub, "get_message", failing_once)
    store(r, first, result=1)
    assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == 1
    assert raised.wait(5)

    second = str(uuid.uuid4())  # only published: someone must still be listening
    pending = waiter.expect(second)
    store(r, second, result=2, keep=False)
    assert waiter.result(pending, timeout=10)["result"] == 2


def test_the_async_waiter(redis_url: str, r: redis.Redis) -> None:
    async def scenario() -> None:
        async with async_waiter(redis_url) as (waiter, shared):
            before = [str(uuid.uuid4()) for _ in range(40)]  # registered before "sending"
            after = [str(uuid.uuid4()) for _ in range(8)]  # waited for after
            pending = [await waiter.expect(task_id) for task_id in before]
            assert all(subscribers(r, task_id) == 1 for task_id in before)
            store(r, after[0], result=after[0])  # before anyone waits: read from the key

            async def wait_after(task_id: str) -> Any:
                return (await waiter.wait(task_id, timeout=20))["result"]

            waits = [asyncio.ensure_future(waiter.result(p, timeout=20)) for p in pending]
            waits += [asyncio.ensure_future(wait_after(t)) for t in after]
            await asyncio.sleep(0.2)
            for task_id in before + after[1:]:
                store(r, task_id, result=task_id, keep=False)
            results = await asyncio.wait_for(asyncio.gather(*waits), 30)
            assert [m["result"] for m in results[: len(before)]] == before
            assert results[len(before) :] == after
            assert not shared._waiting
            eventually(lambda: all(subscribers(r, t) == 0 for t in before + after), "channels left subscribed")
            with pytest.raises(TimeoutError):
                await waiter.wait(str(uuid.uuid4()), timeout=0.2)
            eventually(lambda: not shared._pubsub.channels, "a timed-out waiter left subscribed")

    asyncio.run(scenario())


def test_the_async_waiter_subscribes_many_at_once_over_one_connection(redis_url: str, r: redis.Redis) -> None:
    """64 coroutines registering together on a new waiter (a web app's first burst)."""

    async def scenario() -> None:
        name = f"waiter-{uuid.uuid4().hex[:8]}"
        async with async_waiter(redis_url, name) as (waiter, _):
            ids = [str(uuid.uuid4()) for _ in range(64)]
            pending = await asyncio.wait_for(asyncio.gather(*(waiter.expect(t) for t in ids)), 10)
            waits = [asyncio.ensure_future(waiter.result(p, timeout=5)) for p in pending]
            for task_id in ids:
                store(r, task_id, result=task_id, keep=False)
            results = await asyncio.wait_for(asyncio.gather(*waits), 10)
            assert [m["result"] for m in results] == ids
            connections = [c for c in r.client_list() if c["name"] == name]
            assert len(connections) == 1  # the pub/sub one

    asyncio.run(scenario())


@contextlib.contextmanager
def answering(redis_url: str, queue: str) -> Iterator[None]:
    """A stand-in worker thread: answers each `embed` message on ``queue`` by publishing a
    result (never storing it, so only a subscriber gets it)."""
    stop = threading.Event()

    def serve() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            got = client.brpop([queue], timeout=0.2)
            if got is not None:
                task_id = json.loads(got[1])["headers"]["id"]
                store(client, task_id, result={"embeddings": [[1.0]]}, keep=False)
        client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_one_client_serves_one_event_loop_after_another(redis_url: str) -> None:
    """A script's successive asyncio.run calls, or a test suite's loop per test."""
    from producer import InferenceClient

    queue = f"loops-{uuid.uuid4().hex[:8]}"
    client = InferenceClient(redis_url)
    try:
        with answering(redis_url, queue):
            for _ in range(3):
                result = asyncio.run(asyncio.wait_for(client.aembed("m", "hi", queue=queue), 10))
                assert result == {"embeddings": [[1.0]]}
        assert len(client._async) == 1  # the closed loops' connections were let go
    finally:
        client.close()


def test_an_unreachable_redis_is_an_error_at_once_and_leaves_nothing_behind() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    waiter = ResultWaiter(client)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        waiter.expect(str(uuid.uuid4()))
    assert time.monotonic() - started < 5 and not waiter._waiting
    waiter.close()


KILL_FOR_S = 6.0


def test_subscribers_and_the_listener_ride_out_dropped_connections_together(
    r: redis.Redis, waiter: ResultWaiter, caplog: pytest.LogCaptureFixture
) -> None:
    """Threads subscribe while the pub/sub connection is dropped again and again. Only one
    thread may reconnect it at a time: two handshakes on one connection read each other's
    replies (a subscriber then sees a reply to a command it never sent)."""
    stop = threading.Event()
    errors: list[BaseException] = []
    served = [0]

    def ask(k: int) -> None:
        while not stop.is_set():
            task_id = f"{k}-{uuid.uuid4()}"
            try:
                pending = waiter.expect(task_id)
            except (redis.ConnectionError, redis.TimeoutError):
                continue  # dropped under the subscribe: a caller tries again
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            store(r, task_id, result=k)
            try:
                assert waiter.result(pending, timeout=RECHECK_S * 3)["result"] == k
                served[0] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    askers = [threading.Thread(target=ask, args=(k,), daemon=True) for k in range(8)]
    for t in askers:
        t.start()
    deadline, kills = time.monotonic() + KILL_FOR_S, 0
    while time.monotonic() < deadline and not errors:
        kills += r.client_kill_filter(_type="pubsub", skipme=True)
        time.sleep(0.02)
    stop.set()
    for t in askers:
        t.join(RECHECK_S * 4)
    assert not errors, errors[:3]
    assert not [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert kills >= 5 and served[0] >= 20, (kills, served[0])


def test_coroutines_and_the_async_listener_ride_out_dropped_connections_together(redis_url: str) -> None:
    """The asyncio twin: there two reconnects at once fail outright ("read() called while
    another coroutine is already waiting for incoming data")."""

    async def scenario() -> tuple[int, int]:
        async with async_waiter(redis_url) as (waiter, _):
            return await ride_out(waiter)

    async def ride_out(waiter: AsyncResultWaiter) -> tuple[int, int]:
        r = aioredis.Redis.from_url(redis_url)
        stop = asyncio.Event()
        served = [0]

        async def ask(k: int) -> None:
            while not stop.is_set():
                task_id = f"{k}-{uuid.uuid4()}"
                try:
                    pending = await waiter.expect(task_id)
                except (redis.ConnectionError, redis.TimeoutError):
                    continue
                value = json.dumps({"status": "SUCCESS", "result": k, "task_id": task_id})
                await r.set(RESULT_PREFIX + task_id, value, ex=60)
                await r.publish(RESULT_PREFIX + task_id, value)
                assert (await waiter.result(pending, timeout=RECHECK_S * 3))["result"] == k
                served[0] += 1

        askers = [asyncio.create_task(ask(k)) for k in range(8)]
        try:
            deadline, kills = time.monotonic() + KILL_FOR_S, 0
            while time.monotonic() < deadline and not any(t.done() for t in askers):
                kills += await r.client_kill_filter(_type="pubsub", skipme=True)
                await asyncio.sleep(0.02)
            stop.set()
            done, _ = await asyncio.wait(askers, timeout=RECHECK_S * 4)
            assert len(done) == len(askers), "an asker hung"
            for t in done:
                t.result()  # raises what an asker raised
            return kills, served[0]
        finally:
            for t in askers:
                t.cancel()
            await r.aclose()

    kills, served = asyncio.run(scenario())
    assert kills >= 5 and served >= 20, (kills, served)
