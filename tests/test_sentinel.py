"""Redis Sentinel: a real master, a replica and a sentinel started from ``redis-server``.
The master is SIGKILLed while tasks flow; the sentinel promotes the replica, and the
worker and the producers go on without a restart, losing no task."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from kombu.exceptions import OperationalError

from tests.conftest import WorkerProcess
from tests.redis_servers import RedisServer, Sentinel

MASTER = "mymaster"


@pytest.fixture(scope="module")
def sentinel_set(workdir: Path) -> Iterator[tuple[RedisServer, RedisServer, Sentinel]]:
    master = RedisServer(workdir).start()
    replica = RedisServer(workdir, args=("--replicaof", "127.0.0.1", str(master.port))).start()
    sentinel = Sentinel(workdir, master, MASTER).start()
    deadline = time.monotonic() + 30
    while sentinel.replicas() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # it finds the replica through the master
    assert sentinel.replicas() == 1, "the sentinel never saw the replica"
    yield master, replica, sentinel
    sentinel.stop()
    replica.stop()
    master.stop()


def _caught_up(master: RedisServer, replica: RedisServer, timeout: float = 10) -> None:
    """Until the replica has every write the master took (then a kill loses none of them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        offset = master.client().info("replication")["master_repl_offset"]
        if replica.client().info("replication").get("slave_repl_offset", -1) >= offset:
            return
        time.sleep(0.02)
    raise AssertionError("the replica did not catch up")


def test_a_failover_while_tasks_flow_loses_nothing(
    sentinel_set: tuple[RedisServer, RedisServer, Sentinel],
    workdir: Path,
    minilm_path: str,
    gguf_path: str,
    oracle: Any,
) -> None:
    from producer import InferenceClient

    master, replica, sentinel = sentinel_set
    config = {
        "redis_url": sentinel.url,
        "redis_master_name": MASTER,
        "device": "cpu",
        "models": {
            "minilm": {"task": "embed", "source": minilm_path},  # the bulk intake
            "gemma": {"task": "generate", "source": gguf_path, "n_ctx": 512, "n_threads": 2},  # Celery's consumer
        },
    }
    worker = WorkerProcess("sentinel", config, workdir).start()
    pid = worker.pid
    client = InferenceClient(sentinel.url, master_name=MASTER)
    texts = [f"failover sentence {i}" for i in range(60)]
    expected = dict(zip(texts, oracle.encode(texts, normalize_embeddings=True)))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    paused = threading.Event()
    paused.set()
    stop = threading.Event()

    def produce(k: int) -> None:
        i = 0
        while not stop.is_set():
            paused.wait()
            text = texts[(k * 7 + i) % len(texts)]
            task_id = str(uuid.uuid4())
            deadline = time.monotonic() + 120
            while True:  # a producer rides a failover out the way a web app would: it tries again
                try:
                    client.send("embed", model="minilm", task_id=task_id, input=text)
                    results[task_id] = (text, client.wait(task_id, max(1.0, deadline - time.monotonic())))
                    break
                except (redis.ConnectionError, redis.TimeoutError, ConnectionError, OperationalError) as exc:
                    if time.monotonic() > deadline:
                        errors.append(exc)
                        return
                    time.sleep(0.5)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                    return
            i += 1

    producers = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(8)]
    try:
        for t in producers:
            t.start()
        while len(results) < 100 and not errors:
            time.sleep(0.05)
        # a generation in flight across the failover, on Celery's consumer
        generation = client.celery.send_task(
            "generate", kwargs={"model": "gemma", "prompt": "Once", "max_tokens": 64, "temperature": 0}, queue="gemma"
        )
        paused.clear()  # the sends stop a moment: every queued task is on the replica too
        time.sleep(0.2)
        _caught_up(master, replica)
        old = master.port
        master.kill()
        paused.set()  # sends go on (through the sentinel, to whichever master it names)
        deadline = time.monotonic() + 30
        while sentinel.master_port() in (old, None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sentinel.master_port() == replica.port, "the sentinel did not promote the replica"
        failed_over = len(results)
        while len(results) < failed_over + 150 and not errors and time.monotonic() < deadline + 90:
            time.sleep(0.1)
        stop.set()
        for t in producers:
            t.join(150)
        assert not errors, errors[:3]
        assert len(results) >= failed_over + 150, "tasks stopped flowing after the failover"
        for text, result in results.values():
            assert float(np.dot(result["embeddings"][0], expected[text])) >= 0.9999
        assert client.wait(generation.id, 120)["usage"]["completion_tokens"] > 0
        assert worker.alive() and worker.pid == pid, "the worker restarted"
        print(f"\n{len(results)} embeds answered, {len(results) - failed_over} after the master was killed")
    finally:
        stop.set()
        paused.set()
        client.close()
        worker.stop()
