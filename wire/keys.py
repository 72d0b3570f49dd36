"""Every Redis key and channel the fleet reads or writes, in one place.

kombu's Redis transport owns the queue lists and the ``unacked`` bookkeeping; the fleet
adds three structures beside them (``unacked_owner``, ``redeliveries``, ``exhausted``)
and one liveness key per worker process, so that survivors can hand a dead worker's
messages back within seconds (worker/reclaim.py).
"""

from __future__ import annotations

# CONTRACT §4 and §5
STREAM_PREFIX = "stream:"
CANCEL_PREFIX = "cancel:"
# Celery's Redis result backend: the result key, which is also the channel it is published on
RESULT_PREFIX = "celery-task-meta-"

# kombu's Redis transport: a queue is a list per priority step, named queue + SEP + step
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
UNACKED = "unacked"  # hash: delivery tag -> JSON [message, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # sorted set: delivery tag scored by delivery time
BINDING_PREFIX = "_kombu.binding."

# the fleet's own
UNACKED_OWNER = "unacked_owner"  # hash: delivery tag -> the liveness id of the process holding it
REDELIVERIES = "redeliveries"  # hash: task id -> times it was handed back after its worker died
EXHAUSTED = "exhausted"  # hash: delivery tag -> message over the delivery limit, awaiting its failure result
ALIVE_PREFIX = "worker:alive:"  # + liveness id: a key that lives while its process beats


def priority_keys(queue: str) -> list[str]:
    """A queue's Redis lists in the order kombu consumes them (priority 0 first)."""
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def clamp_priority(value: object) -> int:
    """kombu's clamp of a message's priority to 0-9 (anything unreadable is 0)."""
    try:
        return max(0, min(int(value), 9))  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0


def priority_list(queue: str, priority: object) -> str:
    """The list of ``queue`` that kombu puts a message of ``priority`` on."""
    step = max(s for s in PRIORITY_STEPS if s <= clamp_priority(priority))
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def queue_of_key(key: str) -> str:
    """The queue a priority list belongs to."""
    return key.split(PRIORITY_SEP)[0]
