"""The worker's own CPU cost per task: Celery + JSON + Redis, without (and with) a model.

A worker hosting the bundled MiniLM embed model gets N tasks of three kinds:

* ``trivial``: Celery's built-in ``celery.accumulate`` task (it returns its arguments),
  sent to the worker's queue. The whole Celery path of a task that succeeds: receive,
  decode, the QoS bookkeeping, the pool, the tracer, storing and publishing the result,
  the ack. Nothing of ours runs in it, so this is the dispatch cost of one task.
* ``invalid``: ``embed`` for an alias the worker does not host. It fails validation at once
  with ``InvalidRequest``, after the full Celery path: receive, decode, ack, the task
  wrapper's logging, storing the FAILURE result, publishing it. Celery records every
  failure with its traceback (billiard's picklable copy of each frame, and the formatted
  text), and that is most of this cost: a refused request costs more than a trivial one.
* ``tiny``: ``embed`` of the one-character text "a": the same path plus the smallest
  real forward pass (tokenize, batcher hand-off, MiniLM on 3 tokens, pooling, result).

Each kind runs two ways:

* ``closed loop``: P producer threads each send a task and wait for its result;
* ``drain``: the worker stops consuming its queue (``cancel_consumer``), N tasks are
  enqueued, it resumes (``add_consumer``) and the time to the last result (its
  ``date_done``) is the worker's own drain rate, with no producer in the way.

The worker process's CPU time (user+system, from the kernel) over each phase, less its
idle rate measured first, divided by N, is its CPU per task; 1 s / that is the ceiling
in tasks/s per core. Run by hand (not a test)::

    python bench/bench_dispatch.py --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

ALIAS = "minilm"
UNKNOWN = "no-such-model"


KINDS = ("trivial", "invalid", "tiny")


def send(kind: str, client: Any, queue: str, task_id: str | None = None) -> str:
    if kind == "trivial":
        task_id = task_id or str(uuid.uuid4())
        client.celery.send_task("celery.accumulate", args=[1], queue=queue, task_id=task_id)
        return task_id
    model = UNKNOWN if kind == "invalid" else ALIAS
    return client.send("embed", model=model, queue=queue, task_id=task_id, input="a")


def closed_loop(kind: str, client: Any, queue: str, args: Any) -> h.LoadResult:
    from producer import InvalidRequest

    def one(i: int) -> str | None:
        task_id = send(kind, client, queue)
        if kind == "invalid":
            try:
                client.wait(task_id, args.task_timeout)
            except InvalidRequest:
                return "expected-error"
            raise RuntimeError("an unknown alias did not fail with InvalidRequest")
        result = client.wait(task_id, args.task_timeout)
        if kind == "trivial" and result != [1]:
            raise RuntimeError(f"celery.accumulate returned {result!r}")
        return None

    return h.run_load(one, args.tasks, args.producers, timeout=args.load_timeout)


def drain(kind: str, client: Any, worker: h.Worker, queue: str, args: Any) -> dict[str, Any]:
    """Enqueue N tasks while the worker does not consume, then time how fast it drains them."""
    control = client.celery.control
    reply = control.cancel_consumer(queue, destination=[worker.name], reply=True, timeout=10)
    if not reply:
        raise RuntimeError("the worker did not answer cancel_consumer")
    ids = [str(uuid.uuid4()) for _ in range(args.tasks)]
    try:
        for task_id in ids:
            send(kind, client, queue, task_id)
        time.sleep(0.5)  # let the worker settle before the clock starts
    except BaseException:
        control.add_consumer(queue, destination=[worker.name], reply=True, timeout=10)
        raise
    cpu0 = worker.cpu_seconds()
    start_wall = time.time()
    t0 = time.perf_counter()
    reply = control.add_consumer(queue, destination=[worker.name], reply=True, timeout=10)
    if not reply:
        raise RuntimeError("the worker did not answer add_consumer")
    # wait for every result: poll the keys left, in chunks, bounded
    redis = client._redis
    left = list(ids)
    metas: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.load_timeout
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain: {len(left)} of {len(ids)} results missing after {args.load_timeout:.0f}s")
        still = []
        for k in range(0, len(left), 500):
            chunk = left[k : k + 500]
            for task_id, raw in zip(chunk, redis.mget([f"celery-task-meta-{t}" for t in chunk]), strict=True):
                meta = json.loads(raw) if raw else None
                if meta and meta.get("status") in ("SUCCESS", "FAILURE"):
                    metas[task_id] = meta
                else:
                    still.append(task_id)
        left = still
        if left:
            time.sleep(0.05)
    detected = time.perf_counter() - t0
    cpu = worker.cpu_seconds() - cpu0
    want = "FAILURE" if kind == "invalid" else "SUCCESS"
    wrong = [m for m in metas.values() if m["status"] != want]
    if wrong:
        raise RuntimeError(f"drain {kind}: {len(wrong)} results are not {want}: {wrong[0]}")
    last = max(_timestamp(m["date_done"]) for m in metas.values())
    wall = max(1e-6, last - start_wall)
    return {"wall": wall, "cpu": cpu, "cpu_window": detected}


def _timestamp(iso: str) -> float:
    when = dt.datetime.fromisoformat(iso)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def in_task_ms(worker: h.Worker, task_ids: set[str] | None, since: int) -> float:
    """Median ``task.done`` duration (the task body, validation to result) of events after ``since``."""
    events = worker.events()[since:]
    durations = [
        e["duration_ms"]
        for e in events
        if e.get("event") == "task.done" and "duration_ms" in e and (task_ids is None or e.get("task_id") in task_ids)
    ]
    return h.median(durations) if durations else float("nan")


def measure_intake(
    intake: str, args: Any, wd: Path, models: dict[str, Any], client: Any, queue: str
) -> list[dict[str, Any]]:
    """Every kind, closed loop and drain, against one worker with the given intake."""
    rows: list[dict[str, Any]] = []
    with h.running_worker(
        f"dispatch-{intake}",
        models,
        redis_url=args.redis_url,
        workdir=wd,
        boot_timeout=args.boot_timeout,
        concurrency=args.concurrency,
        intake=intake,
    ) as worker:
        h.log("warm-up")
        for kind in KINDS:
            warm_args = argparse.Namespace(**{**vars(args), "tasks": min(100, args.tasks)})
            warm = closed_loop(kind, client, queue, warm_args)
            if warm.errors:
                raise RuntimeError(f"warm-up {kind} failed: {warm.errors[:3]}\n{worker.log_tail()}")
        h.log(f"idle CPU for {args.idle_seconds:.0f}s")
        c0, t0 = worker.cpu_seconds(), time.perf_counter()
        time.sleep(args.idle_seconds)
        idle_rate = (worker.cpu_seconds() - c0) / (time.perf_counter() - t0)

        for kind in KINDS:
            h.log(f"closed loop, {kind}: {args.tasks} tasks from {args.producers} producers")
            since = len(worker.events())
            cpu0, own0 = worker.cpu_seconds(), h.process_cpu_seconds()
            res = closed_loop(kind, client, queue, args)
            cpu = worker.cpu_seconds() - cpu0
            own = h.process_cpu_seconds() - own0
            if res.errors:
                raise RuntimeError(f"closed loop {kind}: {res.errors[:3]}\n{worker.log_tail()}")
            if kind == "invalid" and res.expected_errors != args.tasks:
                raise RuntimeError(f"only {res.expected_errors} of {args.tasks} failed with InvalidRequest")
            time.sleep(0.3)  # the last log lines
            rows.append(
                {
                    "intake": intake,
                    "idle_rate": idle_rate,
                    "kind": kind,
                    "mode": f"closed loop, {args.producers} producers",
                    "wall": res.wall_s,
                    "cpu": cpu - idle_rate * res.wall_s,
                    "producer_cpu": own,
                    "p50": h.percentile(res.latencies, 50),
                    "in_task": in_task_ms(worker, None, since),
                }
            )
        if not args.skip_drain:
            for kind in KINDS:
                h.log(f"drain, {kind}: {args.tasks} tasks queued first")
                since = len(worker.events())
                d = drain(kind, client, worker, queue, args)
                time.sleep(0.3)
                rows.append(
                    {
                        "intake": intake,
                        "idle_rate": idle_rate,
                        "kind": kind,
                        "mode": "drain (queued first)",
                        "wall": d["wall"],
                        "cpu": d["cpu"] - idle_rate * d["cpu_window"],
                        "producer_cpu": None,
                        "p50": None,
                        "in_task": in_task_ms(worker, None, since),
                    }
                )
    return rows


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=2000, help="tasks per phase")
    p.add_argument("--producers", type=int, default=16, help="producer threads in the closed-loop phases")
    p.add_argument("--concurrency", type=int, default=8, help="worker pool threads (the worker's `concurrency`)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="how long to measure the idle worker's CPU")
    p.add_argument("--task-timeout", type=float, default=120.0, help="seconds to wait for one result")
    p.add_argument("--load-timeout", type=float, default=1800.0, help="seconds one phase may take in all")
    p.add_argument("--skip-drain", action="store_true", help="closed-loop phases only")
    p.add_argument(
        "--intakes", nargs="+", default=["celery", "bulk"], choices=["celery", "bulk"], help="worker intakes to measure"
    )
    args = p.parse_args()
    h.check_redis(args.redis_url)

    queue = h.unique("dispatch")
    models = {ALIAS: {"task": "embed", "source": h.minilm_path(), "queue": queue}}
    client = h.client(args.redis_url, timeouts={"embed": args.task_timeout})
    rows: list[dict[str, Any]] = []
    try:
        for intake in args.intakes:
            with h.workdir(args) as wd:
                rows += measure_intake(intake, args, wd, models, client, queue)
    finally:
        client.close()

    table = []
    for r in rows:
        us = r["cpu"] / args.tasks * 1e6
        table.append(
            [
                r["intake"],
                r["kind"],
                r["mode"],
                f"{r['wall']:.2f}",
                h.num(args.tasks / r["wall"]),
                h.num(us, 0),
                h.num(1e6 / us, 0) if us > 0 else "n/a",
                h.num(r["in_task"], 2) if r["in_task"] == r["in_task"] else "",  # NaN: no task.done
                h.ms(r["p50"]) if r["p50"] is not None else "",
                h.num(r["producer_cpu"] / args.tasks * 1e6, 0) if r["producer_cpu"] is not None else "",
            ]
        )
    idle = ", ".join(f"{r['intake']} {r['idle_rate'] * 1000:.1f}" for r in {r["intake"]: r for r in rows}.values())
    body = f"""### {args.tasks} tasks per phase, worker concurrency {args.concurrency} (threads pool)

{
        h.markdown_table(
            [
                "intake",
                "task",
                "mode",
                "wall s",
                "tasks/s",
                "worker CPU µs/task",
                "ceiling tasks/s/core",
                "median in-task ms",
                "p50 latency ms",
                "producer CPU µs/task",
            ],
            rows=table,
            align="lllrrrrrrr",
        )
    }

`intake`: `celery` is one Celery task per message; `bulk` is the worker's own consumer for
encoder-only queues (the default; worker/intake/), which runs `celery.accumulate`, not an
encoder task, through Celery's tracer in a side thread.
`trivial`: Celery's built-in `celery.accumulate` (returns its argument) on the worker's
queue: Celery + JSON + Redis for a task that succeeds, nothing of ours. `invalid`: `embed`
naming an alias the worker does not host (fails validation with `InvalidRequest`; Celery
then builds and stores the failure's traceback, which is most of its cost). `tiny`:
`embed` of "a" (our task wrapper, logging, tokenizing, the batcher and the smallest
MiniLM forward pass). Worker CPU is the process's user+system time over
the phase less its idle rate (ms CPU per second idle: {idle}). "ceiling
tasks/s/core" = 1 s / CPU per task. "in-task" is the `task.done` log event's `duration_ms`:
under Celery the task body alone (validation to result, without receive, ack and store);
under the bulk intake the time from taking the message to answering it, so in a drain it
includes the wait behind the messages taken with it.
"""
    h.report("bench_dispatch", "Dispatch: the worker's CPU per task", body, args)


if __name__ == "__main__":
    main()
