"""The producer client's own cost: CPU per request and requests/s on the web app's side.

A stand-in worker (a second process: BRPOP the queue, store and publish a fixed
embedding for every message as Celery's Redis backend does) answers at once, so what is
measured is the sending and the awaiting. Paths, in turns, R rounds of N requests each:

1. ``InferenceClient.embed`` from P threads (the sync client);
2. ``await InferenceClient.aembed`` from P coroutines on one event loop (the asyncio client);
3. plain Celery from P threads: ``app.send_task("embed", ...).get()`` with the Redis
   result backend, as the README's "any Celery client" example does.

Reported per path: the median over rounds of requests/s, p50/p99 send-to-result latency,
and the CPU of this process (the producers) per request; the stand-in's CPU per request
for scale. Run by hand (not a test)::

    python bench/bench_producer.py --write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SENTENCE = "The cat quietly watched the morning train."
EMBEDDING = [round(0.001 * k, 3) for k in range(384)]
SYNC, ASYNC, CELERY = "InferenceClient.embed (threads)", "InferenceClient.aembed (asyncio)", "Celery send_task().get()"


def stand_in(redis_url: str, queue: str) -> None:
    """Answer every message on ``queue`` with a fixed embedding until it stays empty 30 s."""
    import redis

    r = redis.Redis.from_url(redis_url)
    result = json.dumps({"model": "m", "embeddings": [EMBEDDING], "dimensions": 384, "usage": {"prompt_tokens": 9}})
    while (got := r.brpop([queue], timeout=30)) is not None:
        raws = [got[1], *(r.rpop(queue, 63) or [])]
        with r.pipeline(transaction=False) as pipe:
            for raw in raws:
                task_id = json.loads(raw)["headers"]["id"]
                meta = (
                    f'{{"status": "SUCCESS", "result": {result}, "traceback": null, "children": [], '
                    f'"date_done": "{time.strftime("%Y-%m-%dT%H:%M:%S")}", "task_id": "{task_id}"}}'
                )
                key = "celery-task-meta-" + task_id
                pipe.set(key, meta, ex=600)
                pipe.publish(key, meta)
            pipe.execute()


def process_cpu(pid: int) -> float:
    """User+system CPU seconds of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(result: dict[str, Any]) -> None:
    if len(result["embeddings"]) != 1 or len(result["embeddings"][0]) != 384:
        raise RuntimeError(f"unexpected result: {str(result)[:200]}")


def sync_load(client: Any, queue: str, n: int, producers: int, timeout: float) -> h.LoadResult:
    return h.run_load(lambda i: check(client.embed("m", SENTENCE, queue=queue)), n, producers, timeout=timeout)


def celery_load(app: Any, queue: str, n: int, producers: int, timeout: float) -> h.LoadResult:
    def one(i: int) -> None:
        check(app.send_task("embed", kwargs={"model": "m", "input": SENTENCE}, queue=queue).get(timeout=60))

    return h.run_load(one, n, producers, timeout=timeout)


class EventLoop:
    """One event loop in a thread of its own for the whole run, as a web app has: the
    asyncio client's connections and listener live on it between rounds."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="event-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def async_load(loop: EventLoop, client: Any, queue: str, n: int, producers: int, timeout: float) -> h.LoadResult:
    """``n`` requests from ``producers`` coroutines on the event loop."""

    async def run() -> h.LoadResult:
        latencies: list[float] = []
        errors: list[str] = []
        todo = iter(range(n))

        async def producer() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    check(await client.aembed("m", SENTENCE, queue=queue))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(producer() for _ in range(producers))), timeout)
        except TimeoutError:
            errors.append(f"load did not finish within {timeout:.0f}s")
        return h.LoadResult(latencies, time.perf_counter() - start, errors, 0)

    return loop.run(run(), timeout + 30)


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per path and round")
    p.add_argument("--producers", type=int, default=64, help="concurrent producer threads (or coroutines)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all paths in turns (medians reported)")
    p.add_argument("--load-timeout", type=float, default=600.0, help="seconds one load may take in all")
    p.add_argument("--stand-in", nargs=2, metavar=("URL", "QUEUE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stand_in:
        stand_in(*args.stand_in)
        return
    h.check_redis(args.redis_url)

    from celery import Celery

    queue = h.unique(f"producer-{uuid.uuid4().hex[:6]}")
    worker = subprocess.Popen([sys.executable, __file__, "--stand-in", args.redis_url, queue])
    client = h.client(args.redis_url)
    loop = EventLoop()
    app = Celery("bench-producer", broker=args.redis_url, backend=args.redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    paths = {
        SYNC: lambda n: sync_load(client, queue, n, args.producers, args.load_timeout),
        ASYNC: lambda n: async_load(loop, client, queue, n, args.producers, args.load_timeout),
        CELERY: lambda n: celery_load(app, queue, n, args.producers, args.load_timeout),
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    try:
        for name, load in paths.items():  # warm-up: connections, threads, the listener
            if (res := load(max(args.producers * 4, 200))).errors:
                raise RuntimeError(f"{name} warm-up failed: {res.errors[:3]}")
        for k in range(args.rounds):
            order = list(paths.items())
            for name, load in order if k % 2 == 0 else order[::-1]:
                h.log(f"round {k + 1}/{args.rounds}: {name}, {args.requests} requests, {args.producers} producers")
                own0, other0 = h.process_cpu_seconds(), process_cpu(worker.pid)
                res = load(args.requests)
                if res.errors:
                    raise RuntimeError(f"{name} failed: {res.errors[:3]}")
                lat = h.summarize(res.latencies)
                samples[name].append(
                    {
                        "rate": res.throughput,
                        "p50": lat["p50"],
                        "p99": lat["p99"],
                        "cpu": (h.process_cpu_seconds() - own0) / res.done,
                        "stand_in_cpu": (process_cpu(worker.pid) - other0) / res.done,
                    }
                )
    finally:
        loop.run(client.aclose(), 30)  # the asyncio side, then the rest
        loop.close()
        app.close()
        worker.kill()
        worker.wait(10)

    med = {name: {key: h.median([s[key] for s in runs]) for key in runs[0]} for name, runs in samples.items()}
    rows = [
        [
            name,
            h.num(m["rate"]),
            h.ms(m["p50"]),
            h.ms(m["p99"]),
            f"{m['cpu'] * 1000:.3f}",
            ", ".join(f"{s['cpu'] * 1000:.3f}" for s in samples[name]),
            f"{m['stand_in_cpu'] * 1000:.3f}",
        ]
        for name, m in med.items()
    ]
    table = h.markdown_table(
        ["path", "req/s", "p50 ms", "p99 ms", "producer CPU ms/req", "per round", "stand-in CPU ms/req"],
        rows,
        align="lrrrrrr",
    )
    ratios = h.markdown_table(
        ["ratio (medians)", "value"],
        [
            [f"Celery CPU per request / {SYNC}", h.ratio(med[CELERY]["cpu"], med[SYNC]["cpu"])],
            [f"Celery CPU per request / {ASYNC}", h.ratio(med[CELERY]["cpu"], med[ASYNC]["cpu"])],
            [f"{SYNC} req/s / Celery", h.ratio(med[SYNC]["rate"], med[CELERY]["rate"])],
        ],
    )
    body = f"""### {args.requests} one-sentence `embed` requests per path and round, {args.producers} producers, {args.rounds} rounds in turns

{table}

{ratios}

The stand-in worker answers every message at once with a fixed 384-float embedding, in
Celery's result format (SET and PUBLISH), so the producer side is all that differs
between the paths. Producer CPU is this process's (user+system) over the load; it shares
the machine with the stand-in and Redis. Medians over rounds; "per round" lists each.
"""
    h.report("bench_producer", "Producer: the client's own cost per request", body, args)


if __name__ == "__main__":
    main()
