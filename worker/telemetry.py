"""Wiring the worker's metrics (worker/metrics.py) and health files (worker/health.py) into
its lifecycle: what worker/lifecycle.py calls, and the Celery signal that times a
Celery-run task's wait in its queue."""

from __future__ import annotations

from typing import Any

from celery.signals import task_prerun

from worker import metrics
from worker.health import Health
from worker.settings import WorkerSettings

health: Health | None = None


def start_metrics(settings: WorkerSettings, hostname: str) -> None:
    """Before the models load, so their load and warm-up times are counted."""
    if settings.metrics_port is None or metrics.active is not None:
        return
    queues = [settings.queue_of(alias) for alias in settings.hosted]
    metrics.active = metrics.Metrics(
        queues, redis_url=settings.redis_url, hostname=hostname, master_name=settings.redis_master_name
    )
    metrics.active.serve(settings.metrics_port, settings.metrics_addr)


def observe_runtime(runtime: Any, alias: str, task: str, queue: str) -> None:
    """Report a loaded runtime's forward passes and requests to the metrics."""
    m = metrics.active
    if m is None:
        return
    batcher = getattr(runtime, "batcher", None)
    if batcher is not None:
        batcher.on_forward = m.forward_observer(alias)
    if hasattr(runtime, "on_request"):

        def on_request(tokenize_s: float, inference_s: float, tokens: int) -> None:
            m.request(alias, task, queue, tokenize_s=tokenize_s, inference_s=inference_s, prompt_tokens=tokens)

        runtime.on_request = on_request


def start_health(settings: WorkerSettings, intake: Any) -> None:
    """Once the models are up: the live file while the worker makes progress, and ready."""
    global health
    if settings.health_dir is None:
        return
    health = Health(settings.health_dir, stall_s=settings.liveness_stall_s)
    if intake is not None:
        health.check("intake", intake.stalled)
    health.start()
    health.mark_ready()


def stop() -> None:
    global health
    if health is not None:
        health.stop()
        health = None


@task_prerun.connect
def _queue_wait(task: Any = None, kwargs: Any = None, **_: Any) -> None:
    """A Celery-run task's time in its queue, from its producer's ``sent_at`` header."""
    m = metrics.active
    if m is None or task is None:
        return
    request = task.request
    model = (kwargs or {}).get("model")
    queue = (request.delivery_info or {}).get("routing_key")
    m.request(str(model), task.name, str(queue), sent_at=request.get("sent_at"))
