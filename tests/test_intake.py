"""The bulk intake (worker/intake/) against a real worker and Redis: what Celery does for a
message, the intake does too (revoke, expiry, ETA, priorities, canvas callbacks, unknown
task names, a warm shutdown), and the ``celery`` intake still gives the same numbers."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from celery import Celery, signature
from celery.exceptions import TaskRevokedError

from tests.conftest import RESULT_TIMEOUT, WorkerProcess, call, queue_name
from tests.test_encoders import check_mixed_requests_equal_alone


def _done_events(worker: Any, task_id: str, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """The task's ``task.done`` lines, waiting (bounded) for the first one."""
    deadline = time.monotonic() + wait_s
    while True:
        done = [e for e in worker.events() if e.get("event") == "task.done" and e.get("task_id") == task_id]
        if done or time.monotonic() > deadline:
            return done
        time.sleep(0.05)


def test_worker_ready_names_the_queues_it_consumes_in_bulk(embed_worker: Any, celery_intake_worker: Any) -> None:
    assert embed_worker.ready_event["bulk_queues"] == [queue_name("minilm")]
    assert celery_intake_worker.ready_event["bulk_queues"] == []
    assert embed_worker.find_event("intake.started")["queues"] == [queue_name("minilm")]


def test_celery_intake_gives_the_same_numbers_under_concurrency(celery_intake_worker: Any, producer: Celery) -> None:
    check_mixed_requests_equal_alone(celery_intake_worker, producer, lambda alias: queue_name(f"cel-{alias}"))


def test_a_revoked_task_never_runs(embed_worker: Any, producer: Celery) -> None:
    task_id = str(uuid.uuid4())
    replies = producer.control.revoke(task_id, reply=True, timeout=5, destination=[embed_worker.name])
    assert replies, "the worker acknowledges the revoke"
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "x"}, queue=queue_name("minilm"), task_id=task_id
    )
    with pytest.raises(TaskRevokedError):
        result.get(timeout=RESULT_TIMEOUT)  # the revoke itself already marks it REVOKED
    assert result.state == "REVOKED"
    # and when its message arrives, the intake drops it unrun
    assert [e["outcome"] for e in _done_events(embed_worker, task_id)] == ["cancelled"]


def test_an_expired_task_never_runs(embed_worker: Any, producer: Celery) -> None:
    past = datetime.now(UTC) - timedelta(seconds=5)
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "x"}, queue=queue_name("minilm"), expires=past
    )
    with pytest.raises(TaskRevokedError):
        result.get(timeout=RESULT_TIMEOUT)
    assert [e["outcome"] for e in _done_events(embed_worker, result.id)] == ["expired"]


def test_a_task_with_an_eta_waits_for_it(embed_worker: Any, producer: Celery, oracle: Any) -> None:
    sent_at = time.time()
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "later"}, queue=queue_name("minilm"), countdown=2
    )
    # meanwhile the worker serves others
    assert call(producer, "embed", queue_name("minilm"), model="minilm", input="now")["dimensions"] == 384
    assert not result.ready()
    # a held message for a task the intake hands to Celery's tracer takes that road when due
    other = producer.send_task("celery.accumulate", args=[7], queue=queue_name("minilm"), countdown=1)
    assert other.get(timeout=RESULT_TIMEOUT) == [7]
    got = result.get(timeout=RESULT_TIMEOUT)
    assert time.time() - sent_at >= 2.0
    expected = oracle.encode(["later"], normalize_embeddings=True)[0]
    assert float(np.dot(got["embeddings"][0], expected)) >= 0.9999


@pytest.fixture(scope="module")
def mixed_worker(start_worker: Any, minilm_path: str, test_models: dict[str, str]) -> WorkerProcess:
    """An embedder and a reranker on one worker (one queue each), embed limited to 3 s. The
    reranker runs 4 pairs per forward pass, so a long rerank is many short passes, and the
    models' shared compute thread takes the embedder's pass between two of them."""
    models = {
        "minilm": {"task": "embed", "source": minilm_path, "queue": queue_name("mixed-minilm")},
        "reranker": {
            "task": "rerank",
            "source": test_models["reranker"],
            "queue": queue_name("mixed-reranker"),
            "batching": {"max_batch_size": 4},
        },
    }
    return start_worker("mixed", models, time_limits={"embed": 3})


def test_a_small_request_is_not_held_behind_a_long_one(mixed_worker: Any, producer: Celery, redis_client: Any) -> None:
    """Results go out as they finish: an embedding taken after a long rerank comes back
    while the rerank still runs, not after it."""
    passage = "A long passage about umbrellas, wind, spokes, canopies and what breaks first. " * 20
    documents = [f"{i}. {passage}" for i in range(64)]  # 16 passes of 4 pairs of ~330 tokens
    long = producer.send_task(
        "rerank",
        kwargs={"model": "reranker", "query": "How do I fix an umbrella?", "documents": documents},
        queue=queue_name("mixed-reranker"),
    )
    deadline = time.monotonic() + RESULT_TIMEOUT
    while redis_client.llen(queue_name("mixed-reranker")) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the intake has taken the rerank
    small = producer.send_task("embed", kwargs={"model": "minilm", "input": "quick"}, queue=queue_name("mixed-minilm"))
    assert small.get(timeout=RESULT_TIMEOUT)["dimensions"] == 384
    assert not long.ready(), "the embedding came back only after the rerank (or the rerank is too short to tell)"
    assert len(long.get(timeout=RESULT_TIMEOUT)["results"]) == len(documents)


def test_a_held_message_starts_its_time_limit_when_due(mixed_worker: Any, producer: Celery) -> None:
    """The 3 s embed limit runs from when the message comes due, not from when it was taken."""
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "later"}, queue=queue_name("mixed-minilm"), countdown=4
    )
    assert result.get(timeout=RESULT_TIMEOUT)["dimensions"] == 384


def test_a_message_sent_with_a_priority_is_served(embed_worker: Any, producer: Celery) -> None:
    # kombu puts it on the queue's priority list ("<queue>\x06\x169"), which the intake reads too
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "x"}, queue=queue_name("minilm"), priority=9
    )
    assert result.get(timeout=RESULT_TIMEOUT)["dimensions"] == 384


def test_a_canvas_callback_runs_as_under_celery(embed_worker: Any, producer: Celery) -> None:
    """A linked task gets the result, through Celery's own tracer. ``celery.accumulate`` (a
    task every worker has) returns the arguments it is given: here, the embedding."""
    callback = signature("celery.accumulate", queue=queue_name("minilm"), app=producer)
    result = producer.send_task(
        "embed", kwargs={"model": "minilm", "input": "linked"}, queue=queue_name("minilm"), link=callback
    )
    first = result.get(timeout=RESULT_TIMEOUT)
    deadline = time.monotonic() + RESULT_TIMEOUT
    child = None
    while child is None and time.monotonic() < deadline:
        result.backend.get_task_meta(result.id, cache=False)  # Celery records the callback as a child
        child = next(iter(producer.AsyncResult(result.id).children or []), None)
        time.sleep(0.1)
    assert child is not None, "the callback was never sent"
    assert child.get(timeout=RESULT_TIMEOUT) == [first]


def test_an_unknown_task_name_fails_as_not_registered(embed_worker: Any, producer: Celery) -> None:
    result = producer.send_task("no.such.task", kwargs={"model": "minilm"}, queue=queue_name("minilm"))
    with pytest.raises(Exception) as info:
        result.get(timeout=RESULT_TIMEOUT)
    assert type(info.value).__name__ == "NotRegistered"
    assert call(producer, "embed", queue_name("minilm"), model="minilm", input="still serving")["dimensions"] == 384


def test_generate_sent_to_an_encoder_queue_is_refused_by_name(embed_worker: Any, producer: Celery) -> None:
    result = producer.send_task("generate", kwargs={"model": "minilm", "prompt": "hi"}, queue=queue_name("minilm"))
    with pytest.raises(Exception) as info:
        result.get(timeout=RESULT_TIMEOUT)
    assert type(info.value).__name__ == "InvalidRequest"
    assert "minilm" in str(info.value)


def test_a_warm_shutdown_answers_what_it_took_and_leaves_the_rest_queued(
    redis_url: str, workdir: Any, minilm_path: str, producer: Celery, redis_client: Any
) -> None:
    queue = queue_name("shutdown")
    config = {
        "redis_url": redis_url,
        "device": "cpu",
        "models": {"m": {"task": "embed", "source": minilm_path, "queue": queue}},
    }
    worker = WorkerProcess("shutdown", {**config, "intake_prefetch": 4}, workdir).start()
    texts = [f"text {i} for the shutdown test, long enough to take a while" for i in range(40)]
    try:
        results = [producer.send_task("embed", kwargs={"model": "m", "input": texts}, queue=queue) for _ in range(30)]
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not any(r.ready() for r in results):
            assert time.monotonic() < deadline, "nothing was answered"
            time.sleep(0.02)
        assert worker.stop(timeout=60) == 0
        answered = [r for r in results if r.state == "SUCCESS"]
        waiting = redis_client.lrange(queue, 0, -1)
        assert 0 < len(answered) < len(results)
        ids = {json.loads(raw)["headers"]["id"] for raw in waiting}
        assert ids == {r.id for r in results if r.state == "PENDING"}
        assert len(answered) + len(ids) == len(results)  # nothing lost, nothing half-done
        unacked = [json.loads(v)[0]["headers"]["id"] for v in redis_client.hvals("unacked")]
        assert not {r.id for r in results} & set(unacked)
        stopped = worker.find_event("intake.stopped")
        assert stopped is not None and stopped["served"] == len(answered)
    finally:
        worker.stop()
        redis_client.delete(queue)


def test_cancel_and_add_consumer_pause_and_resume_a_bulk_queue(embed_worker: Any, producer: Celery) -> None:
    queue, name = queue_name("minilm"), embed_worker.name

    def active() -> list[str]:
        replies = producer.control.inspect(destination=[name], timeout=5).active_queues() or {}
        return [q["name"] for q in replies.get(name, [])]

    assert queue in active()
    assert producer.control.cancel_consumer(queue, destination=[name], reply=True, timeout=5)
    try:
        assert queue not in active()
        result = producer.send_task("embed", kwargs={"model": "minilm", "input": "held"}, queue=queue)
        time.sleep(1.5)
        assert not result.ready()
    finally:
        assert producer.control.add_consumer(queue, destination=[name], reply=True, timeout=5)
    assert result.get(timeout=RESULT_TIMEOUT)["dimensions"] == 384
    assert queue in active()
