"""Remote-control commands an operator (or a test) can send to running workers.

``celery -A worker inspect model_stats`` prints each hosted model's counters.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from models.registry import registry


@inspect_command()
def model_stats(state: Any) -> dict[str, Any]:
    """Per model: requests, forward passes, rows per batch, padding efficiency."""
    from worker import lifecycle

    out: dict[str, Any] = {"models": registry.stats(), "ready": registry.wait_ready(0)}
    if lifecycle.intake is not None:
        out["intake"] = lifecycle.intake.stats.as_dict()
    return out
