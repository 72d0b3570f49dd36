"""``embed`` through a real worker and Redis, against SentenceTransformer as the oracle."""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery

from tests.conftest import RESULT_TIMEOUT, call, queue_name

LONG_TEXT = " ".join(f"token{i} is part of a very long document" for i in range(400))  # >> 512 tokens
CASES = {
    "string": "The cat sits on the mat.",
    "list": ["The cat sits on the mat.", "A dog runs in the park.", "Quantum chromodynamics."],
    "unicode": ["naïve café — 日本語のテキスト 🚀", "Ünïcödé ß ø å", "Привет, мир"],
    "empty_inside": ["first", "", "third"],
    "long": [LONG_TEXT, "short one"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_embed_equals_sentence_transformers(case: str, embed_worker: Any, producer: Celery, oracle: Any) -> None:
    texts = CASES[case]
    result = call(producer, "embed", queue_name("minilm"), model="minilm", input=texts)
    expected = oracle.encode([texts] if isinstance(texts, str) else texts, normalize_embeddings=True)
    got = np.asarray(result["embeddings"])
    assert result["model"] == "minilm"
    assert got.shape == expected.shape
    assert result["dimensions"] == expected.shape[1] == 384
    cosines = (got * expected).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert result["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("case", list(CASES))
def test_embed_with_padding_equals_sentence_transformers(
    case: str, celery_intake_worker: Any, producer: Celery, oracle: Any
) -> None:
    """The padded forward pass (``packed: false``, and every GPU) against the same oracle:
    the worker above runs MiniLM packed, this one padded."""
    texts = CASES[case]
    result = call(producer, "embed", queue_name("cel-minilm"), model="minilm", input=texts)
    expected = oracle.encode([texts] if isinstance(texts, str) else texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.asarray(result["embeddings"]), expected, atol=1e-4)


def test_long_input_is_truncated_to_the_model_limit(embed_worker: Any, producer: Celery) -> None:
    result = call(producer, "embed", queue_name("minilm"), model="minilm", input=LONG_TEXT)
    assert result["usage"]["prompt_tokens"] == 256  # sentence_bert_config.json's max_seq_length


def test_normalize_false_keeps_the_pooled_norm(embed_worker: Any, producer: Celery, minilm_path: str) -> None:
    # all-MiniLM-L6-v2 ends in a Normalize module, so its vectors are unit length either way
    result = call(producer, "embed", queue_name("minilm"), model="minilm", input="x y z", normalize=False)
    assert abs(np.linalg.norm(result["embeddings"][0]) - 1.0) < 1e-5


@pytest.mark.parametrize("send_via_celery", [False, True], ids=["own-messages", "send_task"])
def test_project_client_sync_and_async(embed_worker: Any, redis_url: str, oracle: Any, send_via_celery: bool) -> None:
    from producer import InferenceClient, InvalidRequest

    client = InferenceClient(redis_url, send_via_celery=send_via_celery)
    assert client._direct is not send_via_celery
    sync = client.embed("minilm", ["hello world"], queue=queue_name("minilm"))

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(
            client.aembed("minilm", "hello world", queue=queue_name("minilm")),
            client.aembed("minilm", ["goodbye", "hello world"], queue=queue_name("minilm")),
        )

    first, second = asyncio.run(both())
    expected = oracle.encode(["hello world"], normalize_embeddings=True)[0]
    for vector in (sync["embeddings"][0], first["embeddings"][0], second["embeddings"][1]):
        assert float(np.dot(vector, expected)) >= 0.9999
    with pytest.raises(InvalidRequest, match="input"):
        client.embed("minilm", [], queue=queue_name("minilm"))
    client.close()


BAD_REQUESTS = [
    ("unknown alias", {"model": "no-such-model", "input": "x"}, "model"),
    ("missing model", {"input": "x"}, "model"),
    ("empty input", {"model": "minilm", "input": []}, "input"),
    ("missing input", {"model": "minilm"}, "input"),
    ("input not text", {"model": "minilm", "input": 42}, "input"),
    ("input list of numbers", {"model": "minilm", "input": ["ok", 3]}, "input"),
    ("input nested list", {"model": "minilm", "input": [["a"]]}, "input"),
    ("too many items", {"model": "minilm", "input": ["a"] * 2049}, "input"),
    ("unknown argument", {"model": "minilm", "input": "x", "temperature": 0.5}, "temperature"),
    ("model not a string", {"model": 7, "input": "x"}, "model"),
    ("normalize not a bool", {"model": "minilm", "input": "x", "normalize": "yes"}, "normalize"),
]


@pytest.mark.parametrize("label,kwargs,field", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_fails_with_invalid_request(
    label: str, kwargs: dict[str, Any], field: str, embed_worker: Any, producer: Celery
) -> None:
    result = producer.send_task("embed", kwargs=kwargs, queue=queue_name("minilm"))
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest", repr(info.value)
    assert field in str(info.value)
    assert result.state == "FAILURE"
    # never retried: the worker ran it exactly once
    done = [e for e in embed_worker.events() if e.get("event") == "task.done" and e.get("task_id") == result.id]
    assert len(done) == 1 and done[0]["outcome"] == "invalid"


def test_positional_arguments_are_rejected(embed_worker: Any, producer: Celery) -> None:
    result = producer.send_task("embed", args=["minilm", "x"], queue=queue_name("minilm"))
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest"


def test_worker_still_serves_after_bad_requests(embed_worker: Any, producer: Celery, oracle: Any) -> None:
    for _, kwargs, _field in BAD_REQUESTS:
        producer.send_task("embed", kwargs=kwargs, queue=queue_name("minilm"))
    result = call(producer, "embed", queue_name("minilm"), model="minilm", input="still here")
    expected = oracle.encode(["still here"], normalize_embeddings=True)[0]
    assert float(np.dot(result["embeddings"][0], expected)) >= 0.9999
    assert embed_worker.alive()


class _Exploit:
    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_pickle_message_is_not_executed(embed_worker: Any, redis_url: str, producer: Celery, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    evil = Celery("evil", broker=redis_url, backend=redis_url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"], result_accept_content=["json"])
    assert pickle.loads(pickle.dumps(exploit)) is None and marker.exists()  # the payload works when unpickled
    marker.unlink()
    sent = evil.send_task("embed", kwargs={"model": "minilm", "input": exploit}, queue=queue_name("minilm"))
    # refused unread, and its producer told so at once (CONTRACT §6, v1.1), not left waiting
    with pytest.raises(Exception) as failed:
        producer.AsyncResult(sent.id).get(timeout=RESULT_TIMEOUT)
    assert type(failed.value).__name__ == "InvalidRequest"
    assert "application/x-python-serialize' refused" in str(failed.value)
    refusals = [e for e in embed_worker.events() if e.get("event") == "message.unreadable" and e["task_id"] == sent.id]
    assert refusals and refusals[0]["intake"] == "bulk"
    assert not marker.exists()  # it never ran
    # and the worker carries on
    assert call(producer, "embed", queue_name("minilm"), model="minilm", input="ok")["dimensions"] == 384
    evil.close()


def test_each_task_reaches_the_worker_hosting_its_model(start_worker: Any, producer: Celery, minilm_path: str) -> None:
    left = start_worker("left", {"left-model": {"task": "embed", "source": minilm_path, "queue": queue_name("left")}})
    right = start_worker(
        "right", {"right-model": {"task": "embed", "source": minilm_path, "queue": queue_name("right")}}
    )
    ids = {"left": [], "right": []}
    for _ in range(4):
        for side in ("left", "right"):
            r = producer.send_task("embed", kwargs={"model": f"{side}-model", "input": "x"}, queue=queue_name(side))
            assert r.get(timeout=RESULT_TIMEOUT)["model"] == f"{side}-model"
            ids[side].append(r.id)
    for side, worker in (("left", left), ("right", right)):
        ran = {e.get("task_id") for e in worker.events() if e.get("event") == "task.done"}
        other = "right" if side == "left" else "left"
        assert set(ids[side]) <= ran
        assert not set(ids[other]) & ran
    assert left.ready_event and left.ready_event["queues"] == [queue_name("left")]


def test_a_task_whose_worker_is_killed_is_redelivered_and_completes(
    redis_url: str, workdir: Path, minilm_path: str, producer: Celery, oracle: Any, redis_client: Any
) -> None:
    """A crash loses nothing. The message waits in kombu's unacked hash under its dead
    holder's name, and the next worker hands it back once the holder's liveness key has
    lapsed (worker/reclaim.py), long before the visibility timeout."""
    from tests.conftest import WorkerProcess

    queue = queue_name("crash")
    models = {"crashy": {"task": "embed", "source": minilm_path, "queue": queue}}
    base = {"redis_url": redis_url, "device": "cpu", "models": models}
    texts = [f"sentence number {i} about crashes, redelivery and nothing lost" for i in range(200)]
    first = WorkerProcess("crash-first", base, workdir).start()
    second = None
    try:
        result = producer.send_task("embed", kwargs={"model": "crashy", "input": texts}, queue=queue)
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not any(result.id in raw for raw in redis_client.hvals("unacked")):  # delivered, not acked
            assert time.monotonic() < deadline, "the first worker never took the task"
            time.sleep(0.01)
        assert first.proc is not None
        first.proc.kill()  # SIGKILL: no warm shutdown, nothing handed back
        first.proc.wait(10)
        assert result.state == "PENDING", "the task finished before the kill; the test needs a longer one"

        second = WorkerProcess("crash-second", base, workdir).start()
        got = np.asarray(result.get(timeout=RESULT_TIMEOUT)["embeddings"])
        expected = oracle.encode(texts, normalize_embeddings=True)
        assert got.shape == expected.shape
        assert (got * expected).sum(axis=1).min() >= 0.9999
        done = [e for e in second.events() if e.get("event") == "task.done" and e.get("task_id") == result.id]
        assert done and done[0]["outcome"] == "success"
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        redis_client.delete(queue)


def test_minilm_runs_packed_where_asked(embed_worker: Any, celery_intake_worker: Any) -> None:
    """The tests above really cover both forward passes: packed on the encoder worker (the
    default on the CPU, checked at load), padded where ``packed: false``."""

    def packed(worker: Any) -> bool:
        ready = [e for e in worker.events() if e.get("event") == "model.ready" and e.get("model") == "minilm"]
        assert len(ready) == 1, ready
        return ready[0]["packed"]

    assert packed(embed_worker) is True
    assert embed_worker.find_event("encoder.packed")["max_difference"] < 1e-4
    assert packed(celery_intake_worker) is False
