"""structlog for the worker: JSON lines in production, readable in a terminal.

Celery's own log records pass through the same renderer, so an operator reads one
format. Per-task context (``task_id``, ``task``, ``model``, ``queue``) is bound once in
contextvars by the task wrapper and appears on every line logged while it runs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def observe(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A processor: the worker's metrics read the ``task.done`` and ``model.ready`` events
    (worker/metrics.py), where they are on."""
    from worker import metrics

    return metrics.active.log_processor(logger, method, event) if metrics.active is not None else event


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, observe, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_lines:
        final.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*final, renderer])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libraries that talk too much at INFO; celery's per-task lines (one of which prints the
    # whole result) are replaced by our own ``task.done`` with the timings bound
    for noisy in (
        "httpx",
        "urllib3",
        "filelock",
        "huggingface_hub",
        "transformers",
        "sentence_transformers",
        "celery.app.trace",
        "celery.worker.strategy",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
