"""Liveness and readiness for container probes: two files, and a command that reads them.

A worker with ``health_dir`` set keeps there:

* ``live``, touched every ``BEAT_S`` seconds by a thread of its own, but only while the
  worker makes progress: the bulk intake's loop has gone round lately, and no model's
  compute thread has been busy for ``liveness_stall_s`` without progress (a forward pass,
  a generated token). A wedged model stops the touching, and the probe fails.
* ``ready``, written once the models are loaded and warmed up, and removed when the
  worker stops.

``python -m worker.health live`` (or ``ready``) exits 0 or 1, for Kubernetes ``exec``
probes; it reads ``WORKER_HEALTH_DIR`` (or ``--dir``). It costs no Redis round trip and
no broadcast, unlike ``celery inspect ping``, which is slow and which a busy worker fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("worker")

BEAT_S = 5.0
MAX_AGE_S = 30.0  # the probe's default: six missed beats


class Health:
    def __init__(self, directory: str, *, stall_s: float) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.live = self.dir / "live"
        self.ready = self.dir / "ready"
        self.stall_s = stall_s
        self._checks: dict[str, Callable[[], str | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self.ready.unlink(missing_ok=True)
        self._last_problem: str | None = None

    def check(self, name: str, problem: Callable[[], str | None]) -> None:
        """Add a check: ``problem()`` says what is wrong, or None."""
        self._checks[name] = problem

    def start(self) -> Health:
        from models.compute import compute_threads

        def stalled() -> str | None:
            for thread in compute_threads():
                if (idle := thread.stalled_for()) > self.stall_s:
                    return f"compute thread {thread.name} has made no progress for {idle:.0f}s"
            return None

        self.check("compute", stalled)
        self.beat()
        self._thread.start()
        return self

    def mark_ready(self) -> None:
        self.ready.write_text(f"{os.getpid()}\n")

    def beat(self) -> None:
        problems = [p for check in self._checks.values() if (p := check())]
        if problems:
            if problems[0] != self._last_problem:
                log.error("health.unhealthy", problems=problems)
            self._last_problem = problems[0]
            return
        self._last_problem = None
        self.live.touch()

    def stop(self) -> None:
        self._stop.set()
        self.ready.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the probe fails by itself if this thread stops touching
                log.exception("health.failed")


def probe(kind: str, directory: str, max_age: float = MAX_AGE_S) -> tuple[bool, str]:
    """Whether the worker whose files are in ``directory`` is live (or ready), and why not."""
    live = Path(directory) / "live"
    try:
        age = time.time() - live.stat().st_mtime
    except FileNotFoundError:
        return False, f"{live} does not exist: the worker has not started, or keeps no health files there"
    if age > max_age:
        return False, f"{live} is {age:.0f}s old (more than {max_age:.0f}s): the worker is stuck or gone"
    if kind == "ready" and not (Path(directory) / "ready").exists():
        return False, "not ready: the models are still loading, or the worker is stopping"
    return True, "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["live", "ready"])
    parser.add_argument("--dir", default=os.environ.get("WORKER_HEALTH_DIR"), help="default: $WORKER_HEALTH_DIR")
    parser.add_argument("--max-age", type=float, default=MAX_AGE_S, help="seconds the live file may be old")
    args = parser.parse_args(argv)
    if not args.dir:
        print("no health directory: set WORKER_HEALTH_DIR or pass --dir", file=sys.stderr)
        return 1
    ok, why = probe(args.kind, args.dir, args.max_age)
    if not ok:
        print(why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
