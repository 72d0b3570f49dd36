"""What an operator watches: Prometheus metrics scraped from a real worker while it serves,
Celery task events from both intakes, and the health files and probe."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RESULT_TIMEOUT, ROOT, WorkerProcess, queue_name
from tests.redis_servers import free_port

EMBED_Q, GEN_Q = queue_name("ops-minilm"), queue_name("ops-gemma")


@pytest.fixture(scope="module")
def ops_worker(workdir: Path, redis_url: str, minilm_path: str, gguf_path: str) -> Iterator[WorkerProcess]:
    port = free_port()
    config = {
        "redis_url": redis_url,
        "device": "cpu",
        "models": {
            "minilm": {"task": "embed", "source": minilm_path, "queue": EMBED_Q},
            "gemma": {"task": "generate", "source": gguf_path, "queue": GEN_Q, "n_ctx": 1024, "n_threads": 2},
        },
        "metrics_port": port,
        "metrics_addr": "127.0.0.1",
        "task_events": True,
        "health_dir": str(workdir / "ops-health"),
    }
    worker = WorkerProcess("ops", config, workdir).start()
    worker.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    yield worker
    worker.stop()


def scrape(worker: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(worker.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_under_load(ops_worker: WorkerProcess, redis_url: str) -> None:
    """Scraped while the worker serves 600 embeds from 16 producers and a streamed
    generation: requests by outcome, time in queue, tokenization and model time, forward
    passes, generation timings and load, queue depth as ready plus unacked."""
    from producer import InferenceClient

    client = InferenceClient(redis_url)
    check = redis.Redis.from_url(redis_url)
    labels = {"model": "minilm", "task": "embed", "queue": EMBED_Q}
    try:
        before = scrape(ops_worker)
        ids = [
            client.send("embed", model="minilm", queue=EMBED_Q, input=f"sentence {i} under load") for i in range(600)
        ]
        during = scrape(ops_worker)  # a backlog: the queue's depth counts the ready and the held
        depth = value(during, "inference_queue_depth", queue=EMBED_Q)
        assert depth > 0
        assert depth == value(during, "inference_queue_ready", queue=EMBED_Q) + value(
            during, "inference_queue_unacked", queue=EMBED_Q
        )
        messages: list[dict[str, Any]] = []
        streamer = threading.Thread(
            target=lambda: messages.extend(
                client.stream_generate("gemma", queue=GEN_Q, prompt="Once upon a time", max_tokens=48, temperature=0)
            )
        )
        streamer.start()
        running_seen = 0.0
        deadline = time.monotonic() + 60
        while streamer.is_alive() and time.monotonic() < deadline:
            running_seen = max(running_seen, value(scrape(ops_worker), "inference_generations_running", model="gemma"))
            time.sleep(0.05)
        streamer.join(60)
        for task_id in ids:
            client.wait(task_id, RESULT_TIMEOUT)
        with pytest.raises(Exception, match="input"):
            client.embed("minilm", [], queue=EMBED_Q)
        after = scrape(ops_worker)
        print(
            "\n"
            + "\n".join(f"{n}{dict(ls)} {v:g}" for (n, ls), v in sorted(after.items()) if n.startswith("inference_"))
        )
    finally:
        client.close()
        check.close()

    def grew(name: str, **where: str) -> float:
        return value(after, name, **where) - value(before, name, **where)

    assert grew("inference_requests_total", **labels, outcome="success") >= 600
    assert grew("inference_requests_total", **labels, outcome="invalid") >= 1
    for histogram in (
        "inference_request_duration_seconds",
        "inference_queue_duration_seconds",
        "inference_tokenization_duration_seconds",
        "inference_inference_duration_seconds",
    ):
        assert grew(f"{histogram}_count", **labels) >= 600, histogram
    assert grew("inference_prompt_tokens_total", **labels) >= 600 * 4
    assert grew("inference_batch_rows_sum", model="minilm") >= 600  # every row went through a pass
    passes = grew("inference_batch_rows_count", model="minilm")
    assert 0 < passes < 600, "the embeds shared forward passes"
    assert grew("inference_batch_padded_tokens_sum", model="minilm") >= grew(
        "inference_batch_tokens_total", model="minilm"
    )
    # the generation
    usage = messages[-1]["usage"]
    assert grew("inference_time_to_first_token_seconds_count", model="gemma", queue=GEN_Q) == 1
    assert grew("inference_inter_token_latency_seconds_count", model="gemma") >= len(messages) - 3
    assert grew("inference_completion_tokens_total", model="gemma") == usage["completion_tokens"]
    assert grew("inference_prompt_tokens_total", model="gemma", task="generate") == usage["prompt_tokens"]
    assert grew("inference_requests_total", model="gemma", task="generate", outcome="success") == 1
    assert running_seen == 1
    assert value(after, "inference_generations_waiting", model="gemma") == 0
    # the worker itself
    assert value(after, "inference_queue_depth", queue=EMBED_Q) == 0
    assert value(after, "inference_model_load_seconds", model="minilm") > 0
    assert value(after, "inference_model_warmup_seconds", model="gemma") > 0
    assert value(after, "inference_worker_up") == 1


def test_task_events_from_both_intakes(ops_worker: WorkerProcess, producer: Celery) -> None:
    """Celery's own event receiver sees the bulk intake's tasks (sent in batches) and the
    Celery-run generation, as Flower and celery-exporter would."""
    seen: dict[str, list[str]] = {}
    lock = threading.Lock()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type", "").startswith("task-"):
            with lock:
                seen.setdefault(event["uuid"], []).append(event["type"])

    with producer.connection_for_read() as conn:
        receiver = producer.events.Receiver(conn, handlers={"*": on_event})
        listener = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True
        )
        listener.start()
        time.sleep(1.0)  # bound to its queue
        embeds = [
            producer.send_task("embed", kwargs={"model": "minilm", "input": f"e{i}"}, queue=EMBED_Q) for i in range(20)
        ]
        bad = producer.send_task("embed", kwargs={"model": "minilm", "input": []}, queue=EMBED_Q)
        generation = producer.send_task(
            "generate", kwargs={"model": "gemma", "prompt": "Hi", "max_tokens": 4, "temperature": 0}, queue=GEN_Q
        )
        for result in [*embeds, generation]:
            result.get(timeout=RESULT_TIMEOUT)
        with pytest.raises(Exception, match="input"):
            bad.get(timeout=RESULT_TIMEOUT)
        wanted = {r.id for r in [*embeds, bad, generation]}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if all(("task-succeeded" in seen.get(i, [])) or ("task-failed" in seen.get(i, [])) for i in wanted):
                    break
            time.sleep(0.1)
        receiver.should_stop = True
    for result in embeds:
        assert seen[result.id] == ["task-received", "task-started", "task-succeeded"], seen.get(result.id)
    assert seen[bad.id] == ["task-received", "task-started", "task-failed"]
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen[generation.id])


def _probe(kind: str, directory: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", kind, "--dir", directory], cwd=ROOT, capture_output=True, timeout=60
    ).returncode


def test_the_health_probe_of_a_live_worker(ops_worker: WorkerProcess) -> None:
    directory = ops_worker.config["health_dir"]
    assert _probe("live", directory) == 0
    assert _probe("ready", directory) == 0
    age = time.time() - (Path(directory) / "live").stat().st_mtime
    assert age < 15, "the live file is touched every few seconds"
    assert _probe("live", str(Path(directory) / "elsewhere")) == 1


def test_a_wedged_model_fails_the_liveness_probe(tmp_path: Path) -> None:
    """A compute thread busy without progress stops the live file's touching."""
    from models.compute import ComputeThread
    from worker.health import Health, probe

    health = Health(str(tmp_path), stall_s=0.3)
    health.beat()
    assert probe("live", str(tmp_path), max_age=0.5)[0]
    wedged = ComputeThread("wedged")
    health.start()
    try:
        wedged.submit(time.sleep, 2.0)
        time.sleep(0.6)
        health.beat()
        ok, why = probe("live", str(tmp_path), max_age=0.5)
        assert not ok and "old" in why
        time.sleep(1.6)  # done: progress again
        health.beat()
        assert probe("live", str(tmp_path), max_age=0.5)[0]
    finally:
        health.stop()
        wedged.close()


def test_readiness_goes_with_the_worker(workdir: Path, redis_url: str, minilm_path: str) -> None:
    directory = str(workdir / "ready-health")
    config = {
        "redis_url": redis_url,
        "device": "cpu",
        "models": {"m": {"task": "embed", "source": minilm_path, "queue": queue_name("ready")}},
        "health_dir": directory,
    }
    worker = WorkerProcess("ready", config, workdir).start(wait=False)
    try:
        assert _probe("ready", directory) == 1  # loading
        worker.wait_ready()
        deadline = time.monotonic() + 10
        while _probe("ready", directory) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _probe("ready", directory) == 0
    finally:
        worker.stop()
    assert _probe("ready", directory) == 1
