"""Worker lifecycle: logging at start, models loaded once per serving process.

Models load after the pool exists and before the consumer takes a message: a bootstep
that requires the Pool step (the Consumer step always starts last). With the threads or
solo pool that is the serving process itself; with prefork each child loads its own in
``worker_process_init``, and the parent, which forks, never loads one.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import structlog
from celery import bootsteps
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from models.registry import registry
from worker import memory, telemetry
from worker.celery_app import app, current_settings
from worker.logging import configure_logging
from worker.runtimes import build_runtime
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")
_STARTED = time.monotonic()


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = current_settings()
    configure_logging(settings.log_format, settings.log_level)


ENCODER_SPINCOUNT = "10000"
"""libgomp's spin before an idle OpenMP thread sleeps, in an encoder-only worker (README,
"CPU hosts"). The default, 300,000 spins, kept both of a 2-core host's cores busy for
milliseconds after each forward pass, against the intake, Redis and the producers."""


def openmp_spincount(settings: WorkerSettings, environ: dict[str, str]) -> str | None:
    """The ``GOMP_SPINCOUNT`` this worker sets for itself, or None to leave libgomp's.

    Only in a worker that hosts encoder models alone: torch and llama.cpp share one libgomp
    in a process, and llama.cpp's barriers between the ops of each token need the long
    spin (``OMP_WAIT_POLICY=PASSIVE`` made GGUF decoding ~1.7x slower); a transformers
    generator's decode steps are left alone too. An operator's own ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` always wins.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    if not settings.hosted or any(spec.task == "generate" for spec in settings.hosted.values()):
        return None
    return ENCODER_SPINCOUNT


ONEDNN_CACHE_CAPACITY = "64"
"""Entries in each of oneDNN's primitive caches (oneDNN's own, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
and ideep's inside torch, ``LRU_CACHE_CAPACITY``; both 1,024 by default). The packed
forward pass's matrix products on oneDNN get a primitive per distinct token count, and
each cached one held about 1.6 MiB: with traffic of varied batch sizes a worker's RSS
grew by 1.3 GiB over 200 token counts, and kept growing. 64 holds the few shapes of a
forward pass and of a request's batches."""


def onednn_cache_settings(environ: dict[str, str]) -> dict[str, str]:
    """The cache capacities the worker sets for itself: those an operator has not set."""
    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    return {name: ONEDNN_CACHE_CAPACITY for name in names if name not in environ}


def load_models(settings: WorkerSettings, hostname: str = "") -> None:
    """Load, warm and register every hosted model; any failure stops the worker."""
    # oneDNN and ideep read their cache capacities once, at their first primitive
    if caps := onednn_cache_settings(dict(os.environ)):
        os.environ.update(caps)
        log.info("worker.onednn_cache", **{k.lower(): int(v) for k, v in caps.items()})
    # before the compute threads exist: they would take malloc arenas of their own
    retained = memory.apply(settings.retain_memory, os.environ)
    # libgomp reads its settings when it loads, with torch: so before the import below
    if spincount := openmp_spincount(settings, dict(os.environ)):
        os.environ["GOMP_SPINCOUNT"] = spincount
        log.info("worker.openmp", gomp_spincount=spincount, applied="torch" not in sys.modules)
    import torch

    from models.device import prepare_device, resolve_device

    telemetry.start_metrics(settings, hostname or socket.gethostname())

    if settings.threads_per_worker:
        torch.set_num_threads(settings.threads_per_worker)
    device = resolve_device(settings.device)
    prepare_device(device)
    for alias, spec in settings.hosted.items():
        bound = log.bind(model=alias, queue=settings.queue_of(alias), task=spec.task, backend=spec.backend)
        bound.info("model.loading", source=spec.source, device=device)
        t0 = time.perf_counter()
        runtime = build_runtime(alias, spec, settings, device)
        runtime.load()
        t1 = time.perf_counter()
        runtime.warmup()
        t2 = time.perf_counter()
        registry.add(runtime)
        telemetry.observe_runtime(runtime, alias, spec.task, settings.queue_of(alias))
        bound.info("model.ready", load_s=round(t1 - t0, 3), warmup_s=round(t2 - t1, 3), **runtime.describe())
    if retained:
        log.info("worker.memory_released", mib=round(memory.release_free_pages() / 2**20, 1))
        memory.TrimWatch(settings.retain_memory_slack_mib * 2**20).start()
    registry.mark_ready()


class LoadModels(bootsteps.StartStopStep):
    """Loads the models between the pool's start and the consumer's."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.enabled = current_settings().pool != "prefork"

    def start(self, parent: Any) -> None:
        load_models(current_settings(), parent.hostname)

    def stop(self, parent: Any) -> None:
        registry.close()


app.steps["worker"].add(LoadModels)


class BulkIntakeStep(bootsteps.StartStopStep):
    """Runs the bulk intake (worker/intake/) on the encoder-only queues, which Celery's own
    consumer then leaves alone. Starts after the models load; stops, answering what it
    holds, before they close."""

    requires = (LoadModels,)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        # only what this worker was told to consume (celery worker -Q / -X select from these)
        selected = set(parent.app.amqp.queues.consume_from)
        self.queues = [q for q in current_settings().bulk_queues() if q in selected]
        self.enabled = bool(self.queues)
        if self.enabled:
            parent.app.amqp.queues.deselect(self.queues)

    def start(self, parent: Any) -> None:
        from tasks.schemas import Limits
        from worker.intake import BulkIntake

        global intake
        settings = current_settings()
        intake = BulkIntake(
            parent.app,
            self.queues,
            redis_url=settings.redis_url,
            master_name=settings.redis_master_name,
            prefetch=settings.intake_prefetch,
            time_limits=settings.time_limits,
            limits=Limits(max_items=settings.max_items, max_text_chars=settings.max_text_chars),
            hostname=parent.hostname,
            task_events=settings.task_events,
        )
        intake.start()

    def stop(self, parent: Any) -> None:
        global intake
        if intake is not None:
            intake.stop()
            intake = None


intake: Any = None
"""The running :class:`~worker.intake.BulkIntake`, if any (for ``inspect model_stats``)."""

app.steps["worker"].add(BulkIntakeStep)


class LivenessStep(bootsteps.StartStopStep):
    """Starts the liveness beacon and sweeps (worker/liveness.py, worker/reclaim.py) once the
    models are loaded, before the first message is taken. It stops last, at
    ``worker_shutdown``, after the pool has finished its tasks: then it hands back what
    the process still holds and drops its liveness key."""

    requires = (BulkIntakeStep,)  # (the bulk intake, where there is one, is checked by the health probe)

    def start(self, parent: Any) -> None:
        from wire import connect
        from worker import transport, unreadable
        from worker.liveness import Beacon, identity
        from worker.reclaim import Reclaimer

        global beacon
        settings = current_settings()
        client = connect.client(
            settings.redis_url,
            settings.redis_master_name,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
        )
        reclaimer = Reclaimer(
            client,
            me=identity(),
            grace=settings.liveness_ttl,
            max_deliveries=settings.max_deliveries,
            held=held_tags,
            fail=lambda task_id, error, stream: unreadable.fail(task_id, error, stream=stream),
        )
        beacon = Beacon(
            client,
            name=parent.hostname,
            ttl=settings.liveness_ttl,
            sweep=reclaimer.sweep,
            on_beat=transport.deferred.flush,
        )
        beacon.start()
        telemetry.start_health(settings, intake)


beacon: Any = None
"""The running :class:`~worker.liveness.Beacon`."""

app.steps["worker"].add(LivenessStep)


def held_tags() -> set[str]:
    """The delivery tags this process still means to ack: Celery's known requests, the
    deliveries on its open channels, and the bulk intake's."""
    from celery.worker import state

    from worker.transport import unacked_tags

    tags = unacked_tags()
    for request in list(state.requests.values()):
        tag = getattr(request.message, "delivery_tag", None)
        if tag:
            tags.add(tag)
    if intake is not None:
        tags |= intake.holding()
    return tags


@worker_shutdown.connect
def _stop_beacon(**_: Any) -> None:
    global beacon
    telemetry.stop()
    if beacon is not None:
        beacon.stop()
        beacon = None


@worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    load_models(current_settings())


@worker_process_shutdown.connect
def _close_in_child(**_: Any) -> None:
    registry.close()


@worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    settings = current_settings()
    log.info(
        "worker.ready",
        startup_s=round(time.monotonic() - _STARTED, 3),
        models=sorted(settings.hosted),
        queues=sorted({settings.queue_of(a) for a in settings.hosted}),
        bulk_queues=list(intake.queues) if intake is not None else [],
        pool=settings.pool,
        concurrency=settings.concurrency,
    )
