"""No message, no Redis outage, no killed worker stops service (CONTRACT §4 and §6, v1.1).

Real processes throughout: malformed messages pushed at live workers on both intakes, a
private ``redis-server`` stopped and started under a worker, workers SIGKILLed while they
hold tasks, with another alive to take them over.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from producer.streams import stream_text
from tests.conftest import RESULT_TIMEOUT, WorkerProcess, queue_name
from tests.malformed import MALFORMED, RAW_MALFORMED, fuzzed, malformed
from tests.redis_servers import RedisServer
from wire import keys
from wire.encode import task_message

PROMPT = "The history of the city of Rome begins"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def plain_producer(url: str) -> Celery:
    """A producer with none of the project's code: plain Celery, JSON."""
    app = Celery("fault-producer", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def outcome(app: Celery, task_id: str, timeout: float = RESULT_TIMEOUT) -> tuple[str, Any]:
    """(state, result or the exception's class name and message), within ``timeout``."""
    result = app.AsyncResult(task_id)
    value = result.get(timeout=timeout, propagate=False)
    if isinstance(value, BaseException):
        return result.state, (type(value).__name__, str(value))
    return result.state, value


def held_by(client: redis.Redis, liveness_id: str) -> list[str]:
    """The delivery tags the worker process with this liveness id holds."""
    return [tag.decode() for tag, owner in client.hgetall(keys.UNACKED_OWNER).items() if owner.decode() == liveness_id]


# -- messages no worker can read ---------------------------------------------------------


def _push_and_check(
    producer: Celery, client: redis.Redis, worker: WorkerProcess, queue: str, task: str
) -> list[tuple[str, str | None]]:
    """Push every malformed message (and seeded fuzz) onto ``queue`` in one LPUSH; each one
    with a readable task id must get a final result, the named ones ``InvalidRequest``."""
    named = [(name, *malformed(queue, name, task=task)) for name in [*MALFORMED, *RAW_MALFORMED]]
    fuzz = [fuzzed(queue, seed, task=task) for seed in range(40)]
    client.lpush(queue, *[raw for _, raw, _ in named], *fuzz)
    for name, _, task_id in named:
        if task_id is None:
            continue
        state, value = outcome(producer, task_id)
        assert state == "FAILURE" and value[0] == "InvalidRequest", (name, state, value)
        assert "unreadable task message" in value[1], (name, value)
    for raw in fuzz:
        try:
            task_id = json.loads(raw)["headers"]["id"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(task_id, str) and task_id:
            state, _ = outcome(producer, task_id)  # read or refused: either way answered
            assert state in ("SUCCESS", "FAILURE"), (raw, state)
    assert worker.alive(), worker.log_tail()
    return [(name, task_id) for name, _, task_id in named]


def test_no_message_stops_a_celery_queue(gen_worker: WorkerProcess, producer: Celery, redis_client: Any) -> None:
    """On a queue Celery's consumer takes (a generate model's), every malformed message is
    refused and its task failed at once; the worker goes on serving."""
    client = redis.Redis.from_url(producer.conf.broker_url)
    queue = queue_name("gen-tiny")
    named = _push_and_check(producer, client, gen_worker, queue, task="generate")
    refused = [e for e in gen_worker.events() if e.get("event") == "message.unreadable"]
    assert len(refused) >= len(named) and {e["intake"] for e in refused} == {"celery"}
    # a generation's producer may be reading its stream: that ends too, with the error
    task_id = dict(named)["body is an object"]
    last = json.loads(client.xrevrange(keys.STREAM_PREFIX + task_id, count=1)[0][1][b"data"])
    assert last["type"] == "error" and last["error"]["type"] == "InvalidRequest"
    result = producer.send_task("generate", kwargs={"model": "tiny", "prompt": "hello", "max_tokens": 4}, queue=queue)
    assert result.get(timeout=RESULT_TIMEOUT)["usage"]["completion_tokens"] >= 1
    assert gen_worker.alive()


def test_no_message_stops_the_bulk_intake_nor_costs_its_neighbours(
    embed_worker: WorkerProcess, producer: Celery, oracle: Any
) -> None:
    """Malformed messages taken in the same read as valid ones: the valid ones are answered,
    the malformed refused, and the intake's count of what it holds stays right (it keeps
    taking, and holds nothing once all is answered)."""
    client = redis.Redis.from_url(producer.conf.broker_url)
    queue = queue_name("minilm")
    texts = [f"valid message {i} among malformed ones" for i in range(20)]
    ids = [str(uuid.uuid4()) for _ in texts]
    valid = [
        task_message("embed", i, {"model": "minilm", "input": t}, queue, sender="t", reply_to="r")
        for i, t in zip(ids, texts)
    ]
    named = [malformed(queue, name)[0] for name in [*MALFORMED, *RAW_MALFORMED]]
    mixed = [m for pair in zip(valid, named) for m in pair] + named[len(valid) :]
    client.lpush(queue, *mixed)  # one list: the intake takes them together
    expected = oracle.encode(texts, normalize_embeddings=True)
    for task_id, vector in zip(ids, expected):
        state, value = outcome(producer, task_id)
        assert state == "SUCCESS", value
        assert float(np.dot(value["embeddings"][0], vector)) >= 0.9999
    _push_and_check(producer, client, embed_worker, queue, task="embed")
    fresh = [producer.send_task("embed", kwargs={"model": "minilm", "input": t}, queue=queue) for t in texts]
    for result, vector in zip(fresh, expected):
        assert float(np.dot(result.get(timeout=RESULT_TIMEOUT)["embeddings"][0], vector)) >= 0.9999
    me = embed_worker.liveness_id()
    wait_for(lambda: not held_by(client, me), 10, "the intake still holds deliveries it answered")
    refused = [e for e in embed_worker.events() if e.get("event") == "message.unreadable"]
    assert refused and {e["intake"] for e in refused} == {"bulk"}


def test_bad_text_and_a_bare_documents_string_are_invalid_requests(
    embed_worker: WorkerProcess, encoder_worker: WorkerProcess, gen_worker: WorkerProcess, producer: Celery
) -> None:
    """A lone surrogate (valid JSON, not valid Unicode) and ``documents`` as a string are
    wrong requests: ``InvalidRequest`` naming the field, on either intake."""
    cases = [
        ("embed", queue_name("minilm"), {"model": "minilm", "input": ["fine", "bad \ud800 text"]}, "input.1"),
        ("generate", queue_name("gen-tiny"), {"model": "tiny", "prompt": "\udfff"}, "prompt"),
        (
            "generate",
            queue_name("gen-tiny"),
            {"model": "tiny", "messages": [{"role": "user", "content": "a\ud83d"}]},
            "messages.0.content",
        ),
        ("rerank", queue_name("enc-reranker"), {"model": "reranker", "query": "q", "documents": "one"}, "documents"),
        ("rerank", queue_name("enc-reranker"), {"model": "reranker", "query": "\ud800", "documents": ["d"]}, "query"),
        ("ner", queue_name("enc-ner"), {"model": "ner", "input": "x\udc00"}, "input"),
        ("classify", queue_name("enc-sentiment"), {"model": "sentiment", "input": ["\ud800"]}, "input.0"),
    ]
    for task, queue, kwargs, field in cases:
        state, value = outcome(producer, producer.send_task(task, kwargs=kwargs, queue=queue).id)
        assert state == "FAILURE" and value[0] == "InvalidRequest", (task, kwargs, value)
        assert value[1].startswith(f"{field}:"), value


# -- Redis outages -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def box(workdir: Path) -> Iterator[RedisServer]:
    """A private Redis without persistence: a restart empties it, the worst case."""
    server = RedisServer(workdir).start()
    yield server
    server.stop()


def _models(minilm_path: str, gguf_path: str | None = None) -> dict[str, Any]:
    models: dict[str, Any] = {"minilm": {"task": "embed", "source": minilm_path}}
    if gguf_path:
        models["gemma"] = {"task": "generate", "source": gguf_path, "n_ctx": 2048, "n_threads": 2}
    return models


def _worker(name: str, url: str, models: dict[str, Any], workdir: Path, **settings: Any) -> WorkerProcess:
    return WorkerProcess(name, {"redis_url": url, "device": "cpu", "models": models, **settings}, workdir)


def _embeds_match(app: Celery, oracle: Any, texts: list[str], timeout: float = RESULT_TIMEOUT) -> None:
    results = [app.send_task("embed", kwargs={"model": "minilm", "input": t}, queue="minilm") for t in texts]
    expected = oracle.encode(texts, normalize_embeddings=True)
    for result, vector in zip(results, expected):
        assert float(np.dot(result.get(timeout=timeout)["embeddings"][0], vector)) >= 0.9999


def test_a_redis_restart_during_a_generation_is_ridden_out(
    box: RedisServer, workdir: Path, minilm_path: str, gguf_path: str, oracle: Any
) -> None:
    """Redis goes away for 3 s, and comes back empty, while a generation runs: the worker
    stays up, the generation finishes, its result reaches its producer (plain Celery), and
    the worker serves on."""
    from tests.conftest import FreshLlama

    worker = _worker("outage", box.url, _models(minilm_path, gguf_path), workdir).start()
    app = plain_producer(box.url)
    try:
        kwargs = {"model": "gemma", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
        result = app.send_task("generate", kwargs=kwargs, queue="gemma")
        wait_for(lambda: box.client().xlen(keys.STREAM_PREFIX + result.id) >= 5, 60, "the generation never started")
        box.restart(down_s=3.0)
        got = result.get(timeout=120)
        assert worker.alive(), worker.log_tail()
        llama = FreshLlama(gguf_path)
        expected = llama.create_completion(PROMPT, max_tokens=200, temperature=0)["choices"][0]["text"]
        assert got["text"] == expected and got["usage"]["completion_tokens"] == 200
        # and, idle, across a second restart
        box.restart(down_s=2.0)
        _embeds_match(app, oracle, ["after the restart", "the worker still serves"])
        again = app.send_task("generate", kwargs={**kwargs, "max_tokens": 8, "stream": False}, queue="gemma")
        assert again.get(timeout=RESULT_TIMEOUT)["text"] == expected[: len(again.get()["text"])]
        assert worker.alive()
    finally:
        app.close()
        worker.stop()


@pytest.mark.parametrize("intake", ["bulk", "celery"])
def test_a_worker_started_before_redis_waits_for_it(intake: str, workdir: Path, minilm_path: str, oracle: Any) -> None:
    server = RedisServer(workdir)  # not started yet
    worker = _worker(f"early-{intake}", server.url, _models(minilm_path), workdir, intake=intake).start(wait=False)
    try:
        time.sleep(6.0)  # the models load; then the worker waits for Redis
        assert worker.alive(), worker.log_tail()
        assert worker.find_event("worker.ready") is None
        server.start()
        worker.wait_ready(120)
        app = plain_producer(server.url)
        _embeds_match(app, oracle, ["Redis came late", "and the worker waited"])
        app.close()
    finally:
        worker.stop()
        server.stop()


def test_a_redis_restart_while_the_models_load(box: RedisServer, workdir: Path, minilm_path: str, oracle: Any) -> None:
    worker = _worker("loading", box.url, _models(minilm_path), workdir).start(wait=False)
    try:
        box.stop()
        time.sleep(4.0)
        box.start()
        worker.wait_ready(120)
        app = plain_producer(box.url)
        _embeds_match(app, oracle, ["loaded through an outage"])
        app.close()
    finally:
        worker.stop()


# -- a killed worker -----------------------------------------------------------------------


class Pair:
    """Two workers on one private Redis, each hosting MiniLM and Gemma on shared queues,
    with the default liveness settings."""

    def __init__(self, server: RedisServer, workdir: Path, models: dict[str, Any]) -> None:
        self.server = server
        self.workers = [_worker(f"pair-{side}", server.url, models, workdir) for side in ("a", "b")]
        for worker in self.workers:
            worker.start(wait=False)
        for worker in self.workers:
            worker.wait_ready()
        self.client = server.client()

    def holder(self, tag: str) -> WorkerProcess:
        owner = self.client.hget(keys.UNACKED_OWNER, tag)
        assert owner is not None, "the delivery has no holder"
        return next(w for w in self.workers if w.alive() and w.liveness_id() == owner.decode())

    def tag_of(self, task_id: str) -> str | None:
        for tag, record in self.client.hgetall(keys.UNACKED).items():
            if task_id.encode() in record:
                return tag.decode()
        return None

    def done(self, task_id: str) -> list[dict[str, Any]]:
        return [
            e for w in self.workers for e in w.events() if e.get("event") == "task.done" and e.get("task_id") == task_id
        ]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="module")
def pair(workdir: Path, minilm_path: str, gguf_path: str) -> Iterator[Pair]:
    server = RedisServer(workdir).start()
    p = Pair(server, workdir, _models(minilm_path, gguf_path))
    yield p
    p.stop()
    server.stop()


def up_for(worker: WorkerProcess) -> float:
    """Seconds since the worker logged ``worker.ready``."""
    assert worker.ready_event is not None
    return time.time() - datetime.fromisoformat(worker.ready_event["timestamp"]).timestamp()


def test_a_running_generation_is_never_handed_back(pair: Pair) -> None:
    """While a generation runs for longer than a sweep's period, the other worker sweeps:
    it must not hand back a task whose holder is alive."""
    ttl = 15.0  # the default liveness TTL: a worker's first sweep comes this long after it connects
    wait_for(lambda: min(up_for(w) for w in pair.workers) >= ttl + 1, 30, "both workers sweeping")
    app = plain_producer(pair.server.url)
    prompt = "Count from one to one thousand, in words: one, two, three, four,"
    result = app.send_task(
        "generate", kwargs={"model": "gemma", "prompt": prompt, "max_tokens": 500, "temperature": 0}, queue="gemma"
    )
    got = result.get(timeout=300)
    app.close()
    done = pair.done(result.id)
    assert len(done) == 1 and done[0]["outcome"] == "success"
    sweep_s = ttl / 3  # each worker sweeps this often
    assert done[0]["duration_ms"] > (sweep_s + 0.5) * 1000, "too short to span a sweep; the test needs a longer one"
    assert got["usage"]["completion_tokens"] > 0
    handed = [e for w in pair.workers for e in w.events() if e.get("event") == "reclaim.requeued"]
    assert not handed


def test_a_generation_whose_worker_is_killed_starts_over_elsewhere(pair: Pair) -> None:
    """SIGKILL the worker in the middle of a sampled, streamed generation: the other worker
    runs it again within seconds, whatever its time limit, and its stream goes on after a
    ``reset`` (seq never goes back; the text after the last reset is the result's)."""
    from producer import InferenceClient

    client = InferenceClient(pair.server.url)
    app = plain_producer(pair.server.url)
    task_id = str(uuid.uuid4())
    messages: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: messages.extend(client.read_stream(task_id, timeout=240)), daemon=True)
    reader.start()
    kwargs = {"model": "gemma", "prompt": PROMPT, "max_tokens": 400, "temperature": 1.0, "seed": 5, "stream": True}
    app.send_task("generate", kwargs=kwargs, queue="gemma", task_id=task_id)
    wait_for(lambda: sum(m["type"] == "token" for m in messages) >= 10, 60, "no tokens streamed")
    victim = pair.holder(wait_for(lambda: pair.tag_of(task_id), 10, "no delivery recorded"))
    killed_at = time.monotonic()
    victim.kill()
    try:
        wait_for(lambda: any(m["type"] == "reset" for m in messages), 60, "the generation was not delivered again")
        restarted_s = time.monotonic() - killed_at
        result = app.AsyncResult(task_id).get(timeout=180)
        recovered_s = time.monotonic() - killed_at
        reader.join(30)
        assert not reader.is_alive(), "the stream did not end"
        assert [m["seq"] for m in messages] == list(range(len(messages))), "seq grows by one, never back"
        types = [m["type"] for m in messages]
        assert types.count("reset") == 1 and types.count("end") == 1 and types[-1] == "end", types
        assert next(m for m in messages if m["type"] == "reset")["attempt"] == 2
        assert stream_text(messages) == result["text"] and result["usage"] == messages[-1]["usage"]
        print(f"generation started over {restarted_s:.1f}s after the kill, finished after {recovered_s:.1f}s")
        survivor = next(w for w in pair.workers if w is not victim)
        assert [e["outcome"] for e in pair.done(task_id)] == ["success"]
        assert any(e.get("event") == "reclaim.requeued" and e["task_id"] == task_id for e in survivor.events())
    finally:
        client.close()
        app.close()
        victim.start()


def test_a_killed_workers_held_embeds_run_elsewhere_within_a_minute(pair: Pair, oracle: Any) -> None:
    """SIGKILL a worker while its bulk intake holds many embed messages: with the other
    worker alive, every task completes, the held ones within a minute of the kill, each
    answered once, each right."""
    from producer import InferenceClient

    client = InferenceClient(pair.server.url)
    texts = [f"sentence {i}: a worker dies while it holds this message" for i in range(100)]
    expected = dict(zip(texts, oracle.encode(texts, normalize_embeddings=True)))
    # every stored result is also published on its key: count the answers as they land
    # (the workers log a task as done just before storing it, so a worker killed in
    # between has logged answers that were never stored; its logs cannot count them)
    answers: dict[bytes, int] = {}

    def heard(message: dict[str, Any]) -> None:
        answers[message["channel"]] = answers.get(message["channel"], 0) + 1

    listener = pair.client.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(**{keys.RESULT_PREFIX + "*": heard})
    listening = listener.run_in_thread(sleep_time=0.01, daemon=True)
    time.sleep(0.2)  # subscribed before the first task is sent
    sent = [
        (client.send("embed", model="minilm", input=texts[i % len(texts)]), texts[i % len(texts)]) for i in range(2000)
    ]
    ids = {w.liveness_id(): w for w in pair.workers}

    def loaded() -> WorkerProcess | None:
        counts = {w: len(held_by(pair.client, i)) for i, w in ids.items()}
        victim = max(counts, key=counts.__getitem__)
        return victim if counts[victim] >= 50 else None

    victim = wait_for(loaded, 60, "no worker held 50 messages")
    held = len(held_by(pair.client, victim.liveness_id()))
    killed_at = time.monotonic()
    victim.kill()
    try:
        keys_ = [keys.RESULT_PREFIX + task_id for task_id, _ in sent]
        wait_for(lambda: all(pair.client.mget(keys_)), 90, "not every task was answered")
        recovered_s = time.monotonic() - killed_at
        assert recovered_s < 60, f"the held tasks came back after {recovered_s:.1f}s"
        print(f"{held} held embeds: all 2,000 answered {recovered_s:.1f}s after the kill")
        for (_, text), raw in zip(sent, pair.client.mget(keys_)):
            meta = json.loads(raw)
            assert meta["status"] == "SUCCESS", meta
            assert float(np.dot(meta["result"]["embeddings"][0], expected[text])) >= 0.9999
        wait_for(lambda: sum(answers.values()) >= len(sent), 10, "not every answer was heard")
        twice = [key for key, n in answers.items() if n > 1]
        assert not twice, f"{len(twice)} tasks answered twice"
    finally:
        listening.stop()
        client.close()
        victim.start()


def _lost(pair: Pair, task: str, kwargs: dict[str, Any], queue: str, lost_before: int) -> str:
    """A delivery held by a process that no longer exists, as a SIGKILL leaves it, after its
    task was already lost ``lost_before`` times."""
    task_id = str(uuid.uuid4())
    envelope = json.loads(task_message(task, task_id, kwargs, queue, sender="t", reply_to="r"))
    tag = envelope["properties"]["delivery_tag"]
    with pair.client.pipeline() as pipe:
        pipe.hset(keys.UNACKED, tag, json.dumps([envelope, "", queue]))
        pipe.zadd(keys.UNACKED_INDEX, {tag: time.time() - 60})
        pipe.hset(keys.UNACKED_OWNER, tag, "gone:1:0000")
        if lost_before:
            pipe.hset(keys.REDELIVERIES, task_id, lost_before)
        pipe.execute()
    return task_id


def test_a_task_lost_too_often_fails_instead_of_going_round(pair: Pair) -> None:
    """Deliveries are counted: a task lost once more than ``max_deliveries`` (3) allows
    fails with ``InferenceError`` saying so (and its stream ends with the error); one lost
    fewer times is handed back and served."""
    app = plain_producer(pair.server.url)
    try:
        again = _lost(pair, "embed", {"model": "minilm", "input": "lost once"}, "minilm", lost_before=0)
        state, value = outcome(app, again, timeout=60)
        assert state == "SUCCESS" and len(value["embeddings"]) == 1
        assert pair.client.hget(keys.REDELIVERIES, again) is None  # forgotten once answered

        poison = _lost(pair, "embed", {"model": "minilm", "input": "lost thrice"}, "minilm", lost_before=2)
        state, value = outcome(app, poison, timeout=60)
        assert state == "FAILURE" and value[0] == "InferenceError" and "lost 3 times" in value[1], value

        kwargs = {"model": "gemma", "prompt": "x", "stream": True}
        streamed = _lost(pair, "generate", kwargs, "gemma", lost_before=2)
        state, value = outcome(app, streamed, timeout=60)
        assert state == "FAILURE" and value[0] == "InferenceError"
        last = json.loads(pair.client.xrevrange(keys.STREAM_PREFIX + streamed, count=1)[0][1][b"data"])
        assert last["type"] == "error" and "lost 3 times" in last["error"]["message"]
        assert not pair.client.hlen(keys.EXHAUSTED)
    finally:
        app.close()


def _redelivered_generation(queue: str, task_id: str, kwargs: dict[str, Any]) -> bytes:
    """A generate message as the reclaimer hands it back: marked redelivered."""
    envelope = json.loads(task_message("generate", task_id, kwargs, queue, sender="t", reply_to="r"))
    envelope["headers"]["redelivered"] = True
    envelope["properties"]["delivery_info"]["redelivered"] = True
    return json.dumps(envelope).encode()


def test_a_redelivered_generation_goes_on_in_its_stream_or_is_not_run_again(
    gen_worker: WorkerProcess, producer: Celery, redis_client: Any
) -> None:
    """Delivered again after an earlier delivery wrote part of its stream, a generation
    writes ``reset`` and starts over after it; one whose stream had already ended is not
    run again: its result comes from the stream."""
    client = redis.Redis.from_url(producer.conf.broker_url)
    queue = queue_name("gen-tiny")

    def stream(task_id: str) -> list[dict[str, Any]]:
        return [json.loads(f[b"data"]) for _, f in client.xrange(keys.STREAM_PREFIX + task_id)]

    def write(task_id: str, messages: list[dict[str, Any]]) -> None:
        for seq, message in enumerate(messages):
            client.xadd(keys.STREAM_PREFIX + task_id, {"data": json.dumps({"task_id": task_id, "seq": seq, **message})})
        client.expire(keys.STREAM_PREFIX + task_id, 120)

    kwargs = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0, "stream": True}
    cut = str(uuid.uuid4())
    write(cut, [{"type": "token", "text": "half "}, {"type": "token", "text": "a story"}])
    client.lpush(queue, _redelivered_generation(queue, cut, kwargs))
    result = producer.AsyncResult(cut).get(timeout=RESULT_TIMEOUT)
    messages = stream(cut)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["type"] for m in messages][:3] == ["token", "token", "reset"] and messages[-1]["type"] == "end"
    assert messages[2]["attempt"] == 2 and stream_text(messages) == result["text"]

    ended = str(uuid.uuid4())
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    write(
        ended,
        [
            {"type": "token", "text": "Hel"},
            {"type": "token", "text": "lo"},
            {"type": "end", "finish_reason": "length", "usage": usage},
        ],
    )
    client.lpush(queue, _redelivered_generation(queue, ended, kwargs))
    result = producer.AsyncResult(ended).get(timeout=RESULT_TIMEOUT)
    assert result == {"model": "tiny", "text": "Hello", "finish_reason": "length", "usage": usage}
    assert len(stream(ended)) == 3  # nothing written after its end
    assert any(e.get("event") == "task.rebuilt_from_stream" and e["task_id"] == ended for e in gen_worker.events())
