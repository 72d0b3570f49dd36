"""The bulk intake's Redis side: it takes messages, waits for them, hands them back, and
stores results with their acks.

A take is one Lua script (worker/lua/pop.lua) that pops up to the room left from a
queue's priority lists, in kombu's order, and records each message as kombu records a
delivery (its unacked hash and index), with this process as its holder, in the same
atomic step: from then on, if this process dies, the survivors hand it back
(worker/reclaim.py). With the queues empty, the intake waits with a blocking look that
takes nothing (:meth:`QueueSource.wait`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import Celery

from wire import connect, keys
from worker.intake.job import Job
from worker.intake.stats import IntakeStats
from worker.liveness import identity

log = structlog.get_logger("worker")

IDLE_WAIT_S = 1.0  # the longest wait before the intake loop goes round again
WAIT_SLICE_S = 0.1  # an idle intake's longest look at one queue's first list
RESTORE_INTERVAL_S = 10.0
POP_SCRIPT = (Path(__file__).parent.parent / "lua" / "pop.lua").read_text()


class QueueSource:
    def __init__(
        self, app: Celery, queues: Sequence[str], redis_url: str, stats: IntakeStats, master_name: str | None = None
    ) -> None:
        self.app = app
        self.queues = list(queues)
        self.stats = stats
        self.redis = connect.client(
            redis_url, master_name, socket_timeout=IDLE_WAIT_S + 10, socket_connect_timeout=5, health_check_interval=30
        )
        self._pop_script = self.redis.register_script(POP_SCRIPT)
        self._keys = {q: keys.priority_keys(q) for q in self.queues}
        self._paused: set[str] = set()
        self._next_queue = 0
        self._holding: set[str] = set()  # delivery tags recorded as this process's, not yet acked
        self._holding_lock = threading.Lock()
        self._kombu: Any = None
        self._declared = False
        self._last_restore = -RESTORE_INTERVAL_S

    # -- queues -------------------------------------------------------------------------

    def pause(self, queue: str) -> bool:
        if queue not in self._keys:
            return False
        self._paused.add(queue)
        return True

    def resume(self, queue: str) -> bool:
        if queue not in self._keys:
            return False
        self._paused.discard(queue)
        return True

    def active_queues(self) -> list[str]:
        return [q for q in self.queues if q not in self._paused]

    # -- taking -------------------------------------------------------------------------

    def take(self, room: int, *, until: float | None = None) -> list[Job]:
        """Up to ``room`` messages from the queues in turn; when all are empty, waits for
        one (no later than ``until``, wall-clock, where a held message comes due)."""
        queues = self.active_queues()
        if not queues:
            time.sleep(0.2)
            return []
        n = len(queues)
        order = [queues[(self._next_queue + i) % n] for i in range(n)]
        self._next_queue = (self._next_queue + 1) % n
        jobs = self._pop(order, room)
        if jobs or not self.wait(order, until):
            return jobs
        return self._pop([q for q in order if q not in self._paused], room)  # (one may have paused meanwhile)

    def wait(self, queues: list[str], until: float | None = None) -> bool:
        """Block until a message is on a queue's first list: BLMOVE of the list's next
        message onto the same end of the same list, a blocking look that takes nothing (a
        BRPOP would hold the message outside Redis until it was pushed back, and lose it
        to a crash or an outage in between). The queues take turns in slices of
        ``WAIT_SLICE_S``, with a look at every list between slices, so an idle intake
        notices any message within a slice per queue."""
        deadline = time.time() + IDLE_WAIT_S
        if until is not None:
            deadline = min(deadline, until)
        every_list = [k for q in queues for k in self._keys[q]]
        for queue in itertools.cycle(queues):
            left = deadline - time.time()
            if left <= 0:
                return False
            first = self._keys[queue][0]
            if self.redis.blmove(first, first, max(0.01, min(WAIT_SLICE_S, left)), src="RIGHT", dest="RIGHT"):
                return True
            if self.redis.exists(*every_list):  # another queue's turn, or a priority list
                return True
        return False

    def _pop(self, queues: list[str], room: int) -> list[Job]:
        jobs: list[Job] = []
        me = identity()
        for queue in queues:
            lists = self._keys[queue]
            got = self._pop_script(
                keys=[keys.UNACKED, keys.UNACKED_INDEX, keys.UNACKED_OWNER, *lists], args=[room - len(jobs), me]
            )
            for k in range(0, len(got), 3):
                tag = got[k + 2].decode() if got[k + 2] else None
                jobs.append(Job(raw=got[k + 1], key=lists[int(got[k]) - 1], tag=tag))
            if len(jobs) >= room:
                break
        if jobs:
            self.stats.pops += 1
            self.stats.messages += len(jobs)
            with self._holding_lock:
                self._holding.update(job.tag for job in jobs if job.tag)
        return jobs

    def holding(self) -> set[str]:
        """The delivery tags this intake holds (for worker/reclaim.py)."""
        with self._holding_lock:
            return set(self._holding)

    # -- answering ------------------------------------------------------------------------

    def store(self, commands: list[tuple[Any, ...]], jobs: list[Job]) -> None:
        """Run ``commands`` (results and acks) in one pipeline; the jobs are then no longer
        held. A Redis error is raised, the jobs still held."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            pipe.execute()
        self._release(jobs)

    def restore(self, jobs: list[Job]) -> None:
        """Hand messages back to the front of their lists, as kombu restores unacked ones."""
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for job in jobs:
                    pipe.rpush(job.key, job.raw)
                    if job.tag:
                        pipe.zrem(keys.UNACKED_INDEX, job.tag)
                        pipe.hdel(keys.UNACKED, job.tag)
                        pipe.hdel(keys.UNACKED_OWNER, job.tag)
                pipe.execute()
            self._release(jobs)
        except redis.RedisError as exc:
            log.error("intake.restore_failed", error=str(exc), tasks=len(jobs))

    def _release(self, jobs: list[Job]) -> None:
        with self._holding_lock:
            self._holding.difference_update(job.tag for job in jobs if job.tag)

    # -- upkeep ---------------------------------------------------------------------------

    def maintain(self) -> None:
        """Declare the queues' bindings (again after an outage: Redis may come back without
        them), and hand back unacked messages older than the visibility timeout that name
        no holder (the last resort), on kombu's schedule. kombu's transport does both only
        for a channel that consumes, and Celery's consumer does not consume these queues."""
        if not self._declared:
            with self.app.connection_for_read() as conn:
                channel = conn.default_channel
                for q in self.app.amqp.queues.values():
                    if q.name in self.queues:
                        q(channel).declare()
            self._declared = True
        now = time.monotonic()
        if now - self._last_restore < RESTORE_INTERVAL_S:
            return
        self._last_restore = now
        try:
            if self._kombu is None:
                self._kombu = self.app.connection_for_read()
            channel = self._kombu.default_channel
            channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)
        except Exception as exc:
            log.warning("intake.restore_sweep_failed", error=str(exc))
            if self._kombu is not None:
                self._kombu.release()
                self._kombu = None

    def lost_connection(self) -> None:
        self._declared = False

    def close(self) -> None:
        if self._kombu is not None:
            self._kombu.release()
        self.redis.close()
