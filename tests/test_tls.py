"""``rediss://`` (CONTRACT §1): a worker and both kinds of producer against a real TLS
Redis, ``redis-server`` with a certificate signed by a CA of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery

from producer.streams import stream_text
from tests.conftest import RESULT_TIMEOUT, WorkerProcess
from tests.redis_servers import RedisServer, make_tls


@pytest.fixture(scope="module")
def tls_redis(workdir: Path) -> Iterator[RedisServer]:
    try:
        tls = make_tls(workdir)
        server = RedisServer(workdir, tls=tls).start()
    except RuntimeError as exc:  # no openssl, or a redis-server built without TLS
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_worker(tls_redis: RedisServer, workdir: Path, minilm_path: str, gguf_path: str) -> Iterator[WorkerProcess]:
    models = {
        "minilm": {"task": "embed", "source": minilm_path},  # the bulk intake
        "gemma": {"task": "generate", "source": gguf_path, "n_ctx": 1024, "n_threads": 2},  # Celery's consumer
    }
    worker = WorkerProcess("tls", {"redis_url": tls_redis.url, "device": "cpu", "models": models}, workdir).start()
    yield worker
    worker.stop()


def test_a_plain_redis_client_cannot_talk_to_it(tls_redis: RedisServer) -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_connect_timeout=2, socket_timeout=2).ping()


def test_a_plain_celery_producer_over_tls(tls_redis: RedisServer, tls_worker: WorkerProcess, oracle: Any) -> None:
    app = Celery("tls-producer", broker=tls_redis.url, backend=tls_redis.url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    try:
        got = app.send_task("embed", kwargs={"model": "minilm", "input": "over TLS"}, queue="minilm")
        vector = got.get(timeout=RESULT_TIMEOUT)["embeddings"][0]
        assert float(np.dot(vector, oracle.encode(["over TLS"], normalize_embeddings=True)[0])) >= 0.9999
        kwargs = {"model": "gemma", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        out = app.send_task("generate", kwargs=kwargs, queue="gemma").get(timeout=RESULT_TIMEOUT)
        assert out["usage"]["completion_tokens"] == 8
    finally:
        app.close()


def test_the_producer_client_over_tls(tls_redis: RedisServer, tls_worker: WorkerProcess, oracle: Any) -> None:
    from producer import InferenceClient

    client = InferenceClient(tls_redis.url)
    try:
        vector = client.embed("minilm", "over TLS")["embeddings"][0]
        assert float(np.dot(vector, oracle.encode(["over TLS"], normalize_embeddings=True)[0])) >= 0.9999
        messages = list(client.stream_generate("gemma", prompt="Hello", max_tokens=8, temperature=0, timeout=60))
        assert messages[-1]["type"] == "end" and messages[-1]["usage"]["completion_tokens"] == 8
        assert stream_text(messages) == client.generate("gemma", prompt="Hello", max_tokens=8, temperature=0)["text"]
    finally:
        client.close()
    secrets_logged = [line for line in tls_worker.log_path.read_text().splitlines() if "BEGIN" in line]
    assert not secrets_logged
