"""Prometheus metrics, served by each worker process on ``metrics_port`` (off by default).

Everything is in the ``inference_`` namespace and labelled by ``model``, ``task`` and
``queue`` where those apply, with the names users know from TEI, vLLM and
celery-exporter:

* requests by outcome (``success``, ``invalid``, ``error``, ``cancelled``, ``timeout``,
  and ``expired`` and ``retry`` where those happen) and their time in the worker, read
  off the ``task.done`` log event both intakes emit (a structlog processor: one source
  of truth);
* time in queue (from the producer client's ``sent_at`` header to intake), tokenization
  and model time, as histograms;
* rows, real and padded tokens and seconds per forward pass;
* for ``generate``: time to first token, inter-token latency, prompt and completion
  tokens, generations running and waiting for their model;
* queue depth as the fleet sees it: ready messages over all of a queue's priority lists
  plus the unacked messages held for it (``LLEN`` alone reads near zero while workers
  hold their prefetch), read from Redis at scrape time;
* model load and warm-up time, and ``inference_worker_up``.

Autoscalers should scale on ``max by (queue) (inference_queue_depth)``: every worker
that consumes a queue reports the same depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wire import connect
from wire.depth import queue_depths

log = structlog.get_logger("worker")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PADDED_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
TASK_LABELS = ("model", "task", "queue")


class Metrics:
    def __init__(self, queues: Iterable[str], *, redis_url: str, hostname: str, master_name: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.queues = sorted(set(queues))
        self.hostname = hostname
        r = self.registry
        self.requests = Counter(
            "inference_requests", "Requests answered, by outcome.", [*TASK_LABELS, "outcome"], registry=r
        )
        self.request_seconds = Histogram(
            "inference_request_duration_seconds",
            "From intake to answer (Celery intake: the task body).",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "inference_queue_duration_seconds",
            "From the producer's send (its sent_at header) to the worker's intake.",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "inference_tokenization_duration_seconds",
            "Tokenizing a request.",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "inference_inference_duration_seconds",
            "A request's time in its model, from the batcher to its last row (queueing for a pass included).",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "inference_batch_rows", "Rows (sequences) per forward pass.", ["model"], buckets=ROW_BUCKETS, registry=r
        )
        self.batch_padded_tokens = Histogram(
            "inference_batch_padded_tokens",
            "Padded tokens (rows x the longest row) per forward pass.",
            ["model"],
            buckets=PADDED_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Counter(
            "inference_batch_tokens", "Real tokens through forward passes.", ["model"], registry=r
        )
        self.forward_seconds = Histogram(
            "inference_forward_duration_seconds", "One forward pass.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "inference_time_to_first_token_seconds",
            "From a generation's start to its first piece of text.",
            ["model", "queue"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inference_inter_token_latency_seconds",
            "Between two pieces of a generation's text.",
            ["model", "queue"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("inference_prompt_tokens", "Prompt (input) tokens.", TASK_LABELS, registry=r)
        self.completion_tokens = Counter(
            "inference_completion_tokens", "Generated tokens.", ["model", "queue"], registry=r
        )
        self.model_load_seconds = Gauge("inference_model_load_seconds", "Time to load a model.", ["model"], registry=r)
        self.model_warmup_seconds = Gauge(
            "inference_model_warmup_seconds", "Time to warm a model up.", ["model"], registry=r
        )
        self.up = Gauge("inference_worker_up", "1 while the worker serves.", ["worker"], registry=r)
        self.up.labels(hostname).set(1)
        self.registry.register(QueueDepth(redis_url, self.queues, master_name))
        self.registry.register(GenerationLoad())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics.serving", port=port)

    # -- what the rest of the worker reports ------------------------------------------------

    def log_processor(self, _: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor: ``task.done`` and ``model.ready`` become metrics."""
        name = event.get("event")
        if name == "task.done":
            labels = (str(event.get("model")), str(event.get("task")), str(event.get("queue")))
            self.requests.labels(*labels, str(event.get("outcome"))).inc()
            if "duration_ms" in event:
                self.request_seconds.labels(*labels).observe(event["duration_ms"] / 1000)
        elif name == "model.ready":
            model = str(event.get("model"))
            self.model_load_seconds.labels(model).set(event.get("load_s", 0))
            self.model_warmup_seconds.labels(model).set(event.get("warmup_s", 0))
        return event

    def forward_observer(self, model: str) -> Callable[[int, int, int, float], None]:
        rows, padded, tokens = (
            self.batch_rows.labels(model),
            self.batch_padded_tokens.labels(model),
            self.batch_tokens.labels(model),
        )
        seconds = self.forward_seconds.labels(model)

        def observe(n_rows: int, n_tokens: int, n_padded: int, secs: float) -> None:
            rows.observe(n_rows)
            padded.observe(n_padded)
            tokens.inc(n_tokens)
            seconds.observe(secs)

        return observe

    def request(
        self,
        model: str,
        task: str,
        queue: str,
        *,
        tokenize_s: float | None = None,
        inference_s: float | None = None,
        prompt_tokens: int | None = None,
        sent_at: Any = None,
        taken_at: float | None = None,
    ) -> None:
        """One request's timings: any of them."""
        labels = (model, task, queue)
        if tokenize_s is not None:
            self.tokenize_seconds.labels(*labels).observe(tokenize_s)
        if inference_s is not None:
            self.inference_seconds.labels(*labels).observe(inference_s)
        if prompt_tokens:
            self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
            waited = (taken_at if taken_at is not None else time.time()) - float(sent_at)
            if 0 <= waited < 86400:
                self.queue_seconds.labels(*labels).observe(waited)

    def generation(self, model: str, queue: str) -> GenerationTimer:
        return GenerationTimer(self, model, queue)


class GenerationTimer:
    """One generation's token timings; ``text`` is called with each piece as it comes."""

    def __init__(self, metrics: Metrics, model: str, queue: str) -> None:
        self.metrics, self.model, self.queue = metrics, model, queue
        self.started = time.perf_counter()
        self.last: float | None = None

    def text(self, _: str) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.model, self.queue).observe(now - self.started)
        else:
            self.metrics.itl.labels(self.model, self.queue).observe(now - self.last)
        self.last = now

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.prompt_tokens.labels(self.model, "generate", self.queue).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(self.model, self.queue).inc(completion_tokens)


class QueueDepth(Collector):
    """Each consumed queue's depth at scrape time: ready (every priority list) + unacked."""

    def __init__(self, redis_url: str, queues: list[str], master_name: str | None = None) -> None:
        self.redis_url = redis_url
        self.master_name = master_name
        self.queues = queues
        self._client: redis.Redis | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ready = GaugeMetricFamily("inference_queue_ready", "Messages waiting on the queue's lists.", labels=["queue"])
        unacked = GaugeMetricFamily(
            "inference_queue_unacked", "Messages taken by workers and not yet acked.", labels=["queue"]
        )
        depth = GaugeMetricFamily(
            "inference_queue_depth", "Ready plus unacked: the work the fleet has for the queue.", labels=["queue"]
        )
        try:
            if self._client is None:
                self._client = connect.client(
                    self.redis_url, self.master_name, socket_timeout=2, socket_connect_timeout=2
                )
            depths = queue_depths(self._client, self.queues)
        except redis.RedisError as exc:
            log.warning("metrics.queue_depth_unavailable", error=str(exc))
            return []
        for queue, d in depths.items():
            ready.add_metric([queue], d.ready)
            unacked.add_metric([queue], d.unacked)
            depth.add_metric([queue], d.total)
        return [ready, unacked, depth]


class GenerationLoad(Collector):
    """Each generation model's load at scrape time: generations decoding (up to its
    ``parallel``) and waiting for their turn."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from models.base import GENERATE
        from models.registry import registry

        running = GaugeMetricFamily(
            "inference_generations_running", "Generations decoding on their model now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "inference_generations_waiting", "Generations started, waiting for their model's turn.", labels=["model"]
        )
        for alias, runtime in registry.items():
            if GENERATE in runtime.capabilities:
                now_running, now_waiting = runtime.generation_load()  # type: ignore[attr-defined]
                running.add_metric([alias], now_running)
                waiting.add_metric([alias], now_waiting)
        return [running, waiting]


active: Metrics | None = None
"""The worker process's metrics, where ``metrics_port`` is set."""
