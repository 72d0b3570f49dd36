"""10,000 mixed tasks from 64 producers through two workers, with one worker SIGKILLed and
started again midway and Redis restarted once: no task lost or left hanging, every result
right against the libraries' own answers, and the surviving worker's RSS flat.

Marked ``load``: ``./dev test`` leaves it out, ``./dev test -m load`` runs it, and CI runs
it with everything else.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.conftest import GGUF_CTX, WorkerProcess
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.load

TOTAL = 10_000
PRODUCERS = 64
KILL_AT, REDIS_RESTART_AT = 5_000, 7_000
RSS_AT = (3_000, 6_000, 10_000)
TASK_DEADLINE_S = 240.0  # a producer's patience for one task, outages included

WORDS = "river stone market lantern orchard violin harbor meadow glacier copper ember willow".split()


def _sentence(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + f" ({i})"


class Oracle:
    """The expected result of every distinct request, from the libraries directly."""

    def __init__(self, minilm: Any, test_models: dict[str, str], gguf_path: str) -> None:
        from sentence_transformers import CrossEncoder
        from transformers import pipeline

        from tests.conftest import FreshLlama

        self.texts = [_sentence(i) for i in range(200)]
        self.embeddings = minilm.encode(self.texts, normalize_embeddings=True)
        self.queries = [(self.texts[i], self.texts[i + 1 : i + 5]) for i in range(0, 80, 4)]
        cross = CrossEncoder(test_models["reranker"], device="cpu")
        self.scores = [cross.predict([(q, d) for d in docs]) for q, docs in self.queries]
        ner = pipeline("token-classification", model=test_models["ner"], aggregation_strategy="simple", device="cpu")
        self.entities = [ner(t) for t in self.texts[:20]]
        sentiment = pipeline("text-classification", model=test_models["sentiment"], top_k=None, device="cpu")
        self.labels = [sentiment([t])[0] for t in self.texts[:20]]
        llama = FreshLlama(gguf_path)
        self.prompts = [f"Write one word about {w}:" for w in WORDS[:10]]
        self.completions = [
            llama.create_completion(p, max_tokens=4, temperature=0)["choices"][0]["text"] for p in self.prompts
        ]

    def task(self, i: int) -> tuple[str, dict[str, Any], int]:
        """Task ``i`` of the mix: 80% embed, 6% each rerank, ner and classify, 2% generate."""
        slot, k = i % 50, i // 50
        if slot < 40:
            return "embed", {"model": "minilm", "input": self.texts[(i * 7) % 200]}, (i * 7) % 200
        if slot < 43:
            j = k % len(self.queries)
            return "rerank", {"model": "reranker", "query": self.queries[j][0], "documents": self.queries[j][1]}, j
        if slot < 46:
            return "ner", {"model": "ner", "input": self.texts[k % 20]}, k % 20
        if slot < 49:
            return "classify", {"model": "sentiment", "input": self.texts[k % 20], "top_k": None}, k % 20
        j = k % len(self.prompts)
        return "generate", {"model": "gemma", "prompt": self.prompts[j], "max_tokens": 4, "temperature": 0}, j

    def check(self, kind: str, j: int, result: dict[str, Any]) -> None:
        if kind == "embed":
            assert float(np.dot(result["embeddings"][0], self.embeddings[j])) >= 0.9999
        elif kind == "rerank":
            got = {r["index"]: r["relevance_score"] for r in result["results"]}
            assert all(abs(got[i] - float(s)) < 1e-4 for i, s in enumerate(self.scores[j]))
        elif kind == "ner":
            want = [(e["entity_group"], e["start"], e["end"]) for e in self.entities[j]]
            assert [(e["label"], e["start"], e["end"]) for e in result["entities"][0]] == want
        elif kind == "classify":
            want = {e["label"]: e["score"] for e in self.labels[j]}
            assert all(abs(want[e["label"]] - e["score"]) < 1e-4 for e in result["results"][0])
        else:
            assert result["text"] == self.completions[j]


def test_ten_thousand_mixed_tasks_through_a_killed_worker_and_a_redis_restart(
    workdir: Path, minilm_path: str, test_models: dict[str, str], gguf_path: str, oracle: Any
) -> None:
    from producer import InferenceClient

    expected = Oracle(oracle, test_models, gguf_path)
    server = RedisServer(workdir, persist=True).start()  # a production Redis keeps its data over a restart
    models = {
        "minilm": {"task": "embed", "source": minilm_path},
        "reranker": {"task": "rerank", "source": test_models["reranker"]},
        "ner": {"task": "ner", "source": test_models["ner"]},
        "sentiment": {"task": "classify", "source": test_models["sentiment"]},
        "gemma": {"task": "generate", "source": gguf_path, "n_ctx": GGUF_CTX, "n_threads": 1},
    }
    config = {"redis_url": server.url, "device": "cpu", "models": models, "threads_per_worker": 1}
    victim, survivor = (WorkerProcess(f"load-{s}", config, workdir).start(wait=False) for s in ("a", "b"))
    victim.wait_ready()
    survivor.wait_ready()
    client = InferenceClient(server.url)
    lock = threading.Lock()
    next_task, done = [0], [0]
    outcomes: dict[str, tuple[str, Any]] = {}
    latency: dict[str, float] = {}
    rss: dict[int, float] = {}
    events: dict[str, float] = {}
    failures: list[str] = []

    def retrying(call: Any, deadline: float) -> Any:
        """``call()``, again through a Redis outage, until ``deadline``."""
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def produce() -> None:
        while True:
            with lock:
                i = next_task[0]
                if i >= TOTAL:
                    return
                next_task[0] += 1
            kind, kwargs, j = expected.task(i)
            task_id = str(uuid.uuid4())
            sent_at = time.monotonic()
            deadline = sent_at + TASK_DEADLINE_S
            try:
                retrying(lambda: client.send(kind, task_id=task_id, **kwargs), deadline)  # noqa: B023
                result = retrying(lambda: client.wait(task_id, max(1.0, deadline - time.monotonic())), deadline)  # noqa: B023
                expected.check(kind, j, result)
                outcome = ("ok", result)
            except BaseException as exc:  # noqa: BLE001 - every task is accounted for below
                outcome = (type(exc).__name__, f"{kind} sent {sent_at - started:.1f}s in: {str(exc)[:300]}")
            with lock:
                outcomes[task_id] = outcome
                latency[task_id] = time.monotonic() - sent_at
                done[0] += 1

    def faults() -> None:
        """Kill one worker, start it again, restart Redis, and read the survivor's RSS."""
        restarted: threading.Thread | None = None
        while done[0] < TOTAL and not failures:
            n = done[0]
            for mark in RSS_AT:
                if n >= mark and mark not in rss:
                    rss[mark] = survivor.rss_mb()
            if n >= 1000 and "1k" not in events:
                events["1k"] = time.monotonic()
            if n >= KILL_AT and "killed" not in events:
                victim.kill()
                events["killed"] = time.monotonic()
                restarted = threading.Thread(target=victim.start, daemon=True)
                restarted.start()
            if n >= REDIS_RESTART_AT and "redis" not in events:
                events["redis"] = time.monotonic()
                server.restart(down_s=2.0)
            time.sleep(0.05)
        rss.setdefault(TOTAL, survivor.rss_mb())
        events["done"] = time.monotonic()
        if restarted is not None:
            restarted.join(120)

    started = time.monotonic()
    producers = [threading.Thread(target=produce, daemon=True) for _ in range(PRODUCERS)]
    watcher = threading.Thread(target=faults, daemon=True)
    try:
        for t in [*producers, watcher]:
            t.start()
        for t in producers:
            t.join(900)
        watcher.join(180)
        took = time.monotonic() - started
        assert not any(t.is_alive() for t in producers), "producers still waiting"

        lost = {k: v for k, v in outcomes.items() if v[0] != "ok"}
        ok_runs: Counter[str] = Counter()
        runs: dict[str, list[str]] = {}
        for worker in (victim, survivor):
            for e in worker.events():
                if e.get("event") == "task.done" and e.get("outcome") == "success":
                    ok_runs[e["task_id"]] += 1
                    runs.setdefault(e["task_id"], []).append(
                        f"{worker.name.split('-')[1]} {e['task']} {e['timestamp']}"
                    )
        twice = [t for t in outcomes if ok_runs[t] > 1]
        for task_id in twice:  # a producer's send retried through the outage, or a kill between store and ack
            print(f"answered twice: {task_id}: {runs[task_id]}")
        marks = ", ".join(f"{k} at {v - started:.0f}s" for k, v in events.items())
        print(
            f"\n{len(outcomes)} tasks in {took:.0f}s ({marks}); not answered right: {len(lost)} "
            f"{Counter(v[0] for v in lost.values())}; answered twice: {len(twice)}; "
            f"slowest task {max(latency.values()):.1f}s, p99 {np.percentile(list(latency.values()), 99):.2f}s; "
            f"survivor RSS (MiB): {', '.join(f'{k}: {v:.0f}' for k, v in sorted(rss.items()))}"
        )
        assert len(outcomes) == TOTAL
        assert not lost, list(lost.items())[:5]
        assert max(latency.values()) < 90, "a task waited far longer than a worker's recovery"
        assert "killed" in events and "redis" in events
        assert victim.alive() and victim.find_event("worker.ready"), "the killed worker did not come back"
        assert survivor.alive()
        assert rss[6_000] - rss[3_000] < 0.1 * rss[3_000], rss
        assert rss[TOTAL] - rss[6_000] < 0.1 * rss[6_000], rss
    finally:
        client.close()
        for worker in (victim, survivor):
            worker.stop()
        server.stop()
