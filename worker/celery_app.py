"""The Celery application that ``celery -A worker worker`` starts.

The app reads no settings at import: the first time Celery asks for its configuration,
``_configure`` loads and validates :class:`~worker.settings.WorkerSettings` and turns it
into Celery's settings. A bad configuration stops the worker there, naming the problem.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from worker.backend import backend_url
from worker.services import RedisServices
from worker.settings import ConfigError, WorkerSettings, load_settings
from worker.transport import transport_for

TASK_MODULES = ["tasks.encoders", "tasks.generate"]
RESULT_STORE_RETRY_S = 60.0

app = Celery("worker", include=TASK_MODULES)
app.settings = None  # type: ignore[attr-defined]  # set by _configure
app.services = None  # type: ignore[attr-defined]  # set by _configure: what tasks ask of Redis (tasks/ports.py)


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    queues = []
    for alias in settings.hosted:
        name = settings.queue_of(alias)
        if name not in {q.name for q in queues}:
            queues.append(Queue(name, Exchange(name, type="direct"), routing_key=name))
    assert settings.visibility_timeout is not None
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "result_backend": backend_url(settings.redis_url),
        # JSON only: anything else (pickle above all) is refused before it is decoded
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        # one message at a time per free thread; late acks so a crash redelivers
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # the visibility timeout is the last resort, for unacked messages nobody owns: a dead
        # worker's own come back within seconds (worker/reclaim.py). kombu >= 5.7 scans only
        # on every 10th 10 s tick by default (unacked_restore_throttle); scan on every tick
        "broker_transport_options": {
            "task_queues": [q.name for q in queues],  # read as task messages (worker/transport.py)
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        # a worker waits for Redis as long as it takes, at start and after an outage
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Celery's consumer, refusing what its request code cannot take (worker/consumer.py)
        "worker_consumer": "worker.consumer:Consumer",
        "result_expires": settings.result_expires,
        # a result finished during a Redis outage is stored once Redis is back (up to a minute)
        "result_backend_transport_options": {
            "retry_policy": {"max_retries": None, "timeout": RESULT_STORE_RETRY_S, "interval_max": 2.0}
        },
        "task_queues": queues,
        "task_default_queue": queues[0].name,
        "task_create_missing_queues": False,
        # STARTED in the backend is what tells every *other* worker receiving a revoke()
        # broadcast that the task is running elsewhere; without it they would mark a
        # running generation REVOKED and its real result would be lost. Only generate is
        # cancellable, so only it pays the extra write (see task_annotations)
        "task_track_started": False,
        "task_annotations": {
            kind: {"time_limit": limit, "soft_time_limit": limit * 0.95, "track_started": kind == "generate"}
            for kind, limit in settings.time_limits.items()
        },
        "worker_hijack_root_logger": False,
        # Flower and celery-exporter: task events, from the bulk intake too (task_events)
        "worker_send_task_events": settings.task_events,
        "worker_disable_rate_limits": True,  # no per-task rate-limit bookkeeping
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    config["broker_transport"] = transport_for(settings.redis_url)  # kombu's, reading every message first
    if settings.redis_master_name:  # Sentinel: the master's name, for the broker and the backend alike
        config["broker_transport_options"]["master_name"] = settings.redis_master_name
        config["result_backend_transport_options"]["master_name"] = settings.redis_master_name
    return config


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise SystemExit(f"worker: {exc}") from None
    sender.settings = settings  # type: ignore[attr-defined]
    sender.services = RedisServices(  # type: ignore[attr-defined]
        settings.redis_url, settings.stream_ttl, settings.redis_master_name
    )
    sender.config_from_object(celery_config(settings))


def current_settings() -> WorkerSettings:
    _ = app.conf.broker_url  # forces _configure
    return app.settings  # type: ignore[attr-defined,return-value]
