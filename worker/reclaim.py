"""Handing a dead worker's tasks back to their queues within seconds (CONTRACT §6).

kombu's Redis transport hands an unacked message back once it is older than the
visibility timeout, which must exceed the longest time limit, or a running task would
be handed out twice: twenty minutes with the default limits. Here every delivery also
names its holder (``unacked_owner``: the holding process's liveness id), and each worker
sweeps every few seconds. A delivery whose holder has no live ``worker:alive:<id>`` key
goes back to the head of its queue; so does one its own holder no longer tracks (Celery
drops its ETA timers on a lost connection, for example). A task still held by a live
worker is never handed back. The visibility timeout stays as the last resort for
deliveries nobody owns.

Each hand-back counts against the task (``redeliveries``, by task id). Once a task has
been lost ``max_deliveries`` times it is not handed back again: it fails with
``InferenceError`` saying so, so a message that kills every worker that takes it cannot
go round the fleet for ever.

Two Lua scripts keep this exactly-once when several workers sweep at once: one takes the
deliveries out of kombu's bookkeeping into ``reclaiming``, the other hands each back (or
over to ``exhausted``) only if it can still take it from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog

from wire import keys
from wire.errors import InferenceError

log = structlog.get_logger("worker")

LUA = Path(__file__).with_name("lua")
RECLAIMING = "reclaiming"  # hash: delivery tag -> kombu's unacked record, on its way back


@dataclass
class SweepResult:
    requeued: int = 0
    exhausted: int = 0
    dead_owners: int = 0


class Reclaimer:
    """One worker process's sweeps. ``held`` returns the delivery tags this process still
    means to ack; ``fail`` stores a task's failure result (and ends its stream)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        me: str,
        grace: float,
        max_deliveries: int,
        held: Callable[[], set[str]],
        fail: Callable[[str, InferenceError, bool], None],
    ) -> None:
        self.client = client
        self.me = me
        self.grace = grace
        self.max_deliveries = max_deliveries
        self.held = held
        self.fail = fail
        self._claim = client.register_script((LUA / "claim.lua").read_text())
        self._requeue = client.register_script((LUA / "requeue.lua").read_text())
        self._queues: dict[tuple[str, str], str] = {}

    def sweep(self, *, final: bool = False) -> SweepResult:
        """Hand back what dead workers held, and what this one dropped. ``final``: this
        process is leaving, so everything it still holds goes back now."""
        result = SweepResult()
        owners = {_text(t): _text(o) for t, o in self.client.hgetall(keys.UNACKED_OWNER).items()}
        if owners:
            others = sorted({o for o in owners.values() if o != self.me})
            with self.client.pipeline(transaction=False) as pipe:
                for owner in others:
                    pipe.exists(keys.ALIVE_PREFIX + owner)
                alive = {o for o, live in zip(others, pipe.execute()) if live}
            held = set() if final else self.held()
            claim: list[str] = []
            for tag, owner in owners.items():
                if (owner == self.me and tag not in held) or (owner != self.me and owner not in alive):
                    claim += [tag, owner]
            result.dead_owners = len({o for o in owners.values() if o != self.me and o not in alive})
            if claim:
                grace = 0 if final else self.grace
                self._claim(
                    keys=[keys.UNACKED, keys.UNACKED_INDEX, keys.UNACKED_OWNER, RECLAIMING], args=[grace, *claim]
                )
        # what this sweep took, and whatever an interrupted sweep left behind
        for tag, record in self.client.hgetall(RECLAIMING).items():
            self._hand_back(_text(tag), record, result)
        for tag, message in self.client.hgetall(keys.EXHAUSTED).items():
            self._fail_exhausted(_text(tag), message)
        if result.requeued or result.exhausted:
            log.warning("reclaim.handed_back", requeued=result.requeued, exhausted=result.exhausted, final=final)
        return result

    def _hand_back(self, tag: str, record: bytes, result: SweepResult) -> None:
        try:
            envelope, exchange, routing_key = json.loads(record)
            props = envelope["properties"]
            headers = envelope.get("headers") or {}
            task_id = headers.get("id") or props.get("correlation_id") or tag
            # as kombu marks a message it restores
            headers["redelivered"] = True
            props.setdefault("delivery_info", {})["redelivered"] = True
            queue = self._queue(exchange, routing_key)
            list_key = keys.priority_list(queue, props.get("priority"))
            payload = json.dumps(envelope)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("reclaim.unreadable", tag=tag, error=str(exc))
            self.client.hdel(RECLAIMING, tag)
            return
        n = self._requeue(
            keys=[RECLAIMING, keys.REDELIVERIES, keys.EXHAUSTED, list_key],
            args=[tag, task_id, payload, self.max_deliveries],
        )
        if n > 0:
            result.requeued += 1
            log.info("reclaim.requeued", task_id=task_id, task=headers.get("task"), queue=queue, lost=n)
        elif n < 0:
            result.exhausted += 1
            self._fail_exhausted(tag, payload)

    def _fail_exhausted(self, tag: str, message: bytes | str) -> None:
        try:
            envelope = json.loads(message)
            headers = envelope.get("headers") or {}
            task_id = headers.get("id") or envelope["properties"].get("correlation_id")
            task = headers.get("task")
        except (ValueError, KeyError, TypeError, AttributeError):
            task_id = task = None
        if task_id:
            error = InferenceError(
                f"task {task_id} was lost {self.max_deliveries} times: each worker that took it stopped before "
                "finishing it, so it is not delivered again"
            )
            log.error("reclaim.exhausted", task_id=task_id, task=task, deliveries=self.max_deliveries)
            self.fail(task_id, error, task == "generate")
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(keys.EXHAUSTED, tag)
            if task_id:
                pipe.hdel(keys.REDELIVERIES, task_id)
            pipe.execute()

    def _queue(self, exchange: str, routing_key: str) -> str:
        """The queue kombu would route to: the routing key on the default exchange, else the
        exchange's binding for that key (kombu's binding table), else the routing key."""
        found = self._queues.get((exchange, routing_key))
        if found is None:
            found = routing_key
            if exchange:
                for member in self.client.smembers(keys.BINDING_PREFIX + exchange):
                    rk, _, queue = _text(member).split(keys.PRIORITY_SEP)
                    if rk == routing_key:
                        found = queue
                        break
            self._queues[(exchange, routing_key)] = found
        return found


def _text(value: bytes | str | Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
