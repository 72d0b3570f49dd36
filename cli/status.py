"""The fleet's status: its workers (by their liveness keys, and what they say when asked),
the models each serves, its queues' depths and the work in flight."""

from __future__ import annotations

from typing import Any

from celery import Celery
from rich.console import Console
from rich.table import Table

from wire import connect, keys
from wire.depth import queue_depths


def fleet_status(redis_url: str, timeout: float, master_name: str | None = None) -> dict[str, Any]:
    client = connect.client(redis_url, master_name, socket_timeout=10, socket_connect_timeout=5, decode_responses=True)
    alive = {}
    for key in client.scan_iter(match=keys.ALIVE_PREFIX + "*", count=1000):
        alive[key.removeprefix(keys.ALIVE_PREFIX)] = client.get(key)
    app = Celery("status", broker=redis_url, backend="disabled", set_as_current=False)
    if master_name:
        app.conf.broker_transport_options = {"master_name": master_name}
    try:
        inspect = app.control.inspect(timeout=timeout)
        queues_by_worker = inspect.active_queues() or {}
        stats_by_worker = inspect._request("model_stats") or {}  # the worker's own inspect command
    finally:
        app.close()
    workers = []
    names = sorted(set(queues_by_worker) | set(stats_by_worker) | {n for n in alive.values() if n})
    for name in names:
        stats = stats_by_worker.get(name) or {}
        workers.append(
            {
                "name": name,
                "alive": name in alive.values(),
                "answered": name in queues_by_worker or name in stats_by_worker,
                "queues": sorted(q["name"] for q in queues_by_worker.get(name, []) if not q["name"].endswith("pidbox")),
                "models": sorted((stats.get("models") or {}).keys()),
                "ready": stats.get("ready"),
            }
        )
    queues = sorted({q for w in workers for q in w["queues"]})
    depths = queue_depths(client, queues)
    in_flight = client.hlen(keys.UNACKED)
    client.close()
    return {
        "workers": workers,
        "processes_alive": len(alive),
        "queues": [
            {
                "queue": q,
                "ready": d.ready,
                "in_flight": d.unacked,
                "depth": d.total,
                "consumers": sum(q in w["queues"] for w in workers),
            }
            for q, d in depths.items()
        ],
        "in_flight": in_flight,
    }


def render_status(report: dict[str, Any], console: Console) -> None:
    workers = Table(title=f"workers ({report['processes_alive']} processes beating)")
    for column in ("worker", "alive", "answered", "ready", "models", "queues"):
        workers.add_column(column)
    for w in report["workers"]:
        workers.add_row(
            w["name"],
            "yes" if w["alive"] else "[red]no",
            "yes" if w["answered"] else "[yellow]no",
            "yes" if w["ready"] else "-",
            ", ".join(w["models"]),
            ", ".join(w["queues"]),
        )
    console.print(workers)
    queues = Table(title=f"queues ({report['in_flight']} messages in flight in all)")
    for column in ("queue", "ready", "in flight", "depth", "consumers"):
        queues.add_column(column, justify="right" if column != "queue" else "left")
    for q in report["queues"]:
        queues.add_row(q["queue"], str(q["ready"]), str(q["in_flight"]), str(q["depth"]), str(q["consumers"]))
    console.print(queues)
