"""A queue's depth as the fleet sees it: the messages waiting on its lists (every priority
step) plus those workers have taken and not yet acked. ``LLEN`` alone reads near zero
while busy workers hold their prefetch. Read by the worker's metrics and the CLI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from wire import keys

# the unacked deliveries per routing key (kombu's record ends with the exchange and the
# routing key as JSON strings): [key, count, key, count, ...]
_UNACKED_BY_QUEUE = """
local counts = {}
for _, record in ipairs(redis.call('HVALS', KEYS[1])) do
  local rk = string.match(record, ',%s*"([^"]*)"%]$')
  if rk then counts[rk] = (counts[rk] or 0) + 1 end
end
local out = {}
for rk, n in pairs(counts) do out[#out + 1] = rk; out[#out + 1] = n end
return out
"""


@dataclass(frozen=True)
class Depth:
    ready: int
    unacked: int

    @property
    def total(self) -> int:
        return self.ready + self.unacked


def queue_depths(client: Any, queues: Iterable[str]) -> dict[str, Depth]:
    """Each queue's depth, in two round trips (the unacked count is per routing key, which
    is the queue's name in this fleet)."""
    queues = list(queues)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in keys.priority_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
    flat = client.eval(_UNACKED_BY_QUEUE, 1, keys.UNACKED)
    held = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    steps = len(keys.PRIORITY_STEPS)
    return {
        queue: Depth(sum(lengths[n * steps : (n + 1) * steps]), held.get(queue, 0)) for n, queue in enumerate(queues)
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
