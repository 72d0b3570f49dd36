"""Each worker process's liveness in Redis, and the thread that keeps it and sweeps.

A worker process has a liveness id of its own (a new one after every start), named as
the owner of every delivery it takes. Its beacon thread sets ``worker:alive:<id>`` every
``liveness_ttl / 5`` seconds, with a time to live of ``liveness_ttl``: once the process
dies, the key lapses, and the other workers' sweeps hand its deliveries back
(worker/reclaim.py). The same thread sweeps every ``liveness_ttl / 3`` seconds, sends
again the acks that could not reach Redis, and on the way out hands back whatever the
process still holds before it deletes its key.

After a Redis outage the thread waits one ``liveness_ttl`` before it sweeps again, so
that every live worker has beaten in the meantime and none is taken for dead.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import redis
import structlog

from wire import keys

log = structlog.get_logger("worker")

_identity: tuple[int, str] = (0, "")


def identity() -> str:
    """This process's liveness id: host, pid and a random part (so a restarted worker
    with the same pid is another holder)."""
    global _identity
    pid = os.getpid()
    if _identity[0] != pid:
        _identity = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}")
    return _identity[1]


class Beacon:
    """Keeps this process's liveness key and runs its sweeps, on a thread of its own."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        ttl: float,
        sweep: Callable[..., object],
        on_beat: Callable[[redis.Redis], object] | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.ttl = ttl
        self.key = keys.ALIVE_PREFIX + identity()
        self._sweep = sweep
        self._on_beat = on_beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected_since: float | None = None
        self._next_sweep = 0.0

    def start(self) -> None:
        self._beat()  # before the first message is taken, where Redis answers
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()
        log.info("liveness.started", id=identity(), ttl_s=self.ttl)

    def stop(self) -> None:
        """Hand back what this process still holds, then stop beating and drop the key."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self._sweep(final=True)
            self.client.delete(self.key)
        except redis.RedisError as exc:  # the key lapses by itself; survivors sweep
            log.warning("liveness.stop_incomplete", error=str(exc))

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            self._beat()

    def _beat(self) -> None:
        try:
            self.client.set(self.key, self.name, px=int(self.ttl * 1000))
            now = time.monotonic()
            if self._connected_since is None:
                self._connected_since = now
            if self._on_beat is not None:
                self._on_beat(self.client)
            if now - self._connected_since >= self.ttl and now >= self._next_sweep:
                self._next_sweep = now + self.ttl / 3
                self._sweep()
        except redis.RedisError as exc:
            if self._connected_since is not None:
                log.warning("liveness.redis_unreachable", error=str(exc))
            self._connected_since = None
        except Exception:  # noqa: BLE001 - the beacon never dies
            log.exception("liveness.failed")
