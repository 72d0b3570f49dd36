"""kombu's Redis transport, without a per-message cost it need not pay.

kombu 5.7 builds a new ``redis.Redis`` client object for most channel operations other
than the consumer's BRPOP: every publish (``LPUSH``) and, with late acks, the "unacked"
bookkeeping around every message (recorded at delivery so that a worker that dies has
its messages redelivered, removed at ack). redis-py 8 copies its several hundred
response callbacks into a case-insensitive dict whenever a client is built. Under the
embed load that was 16% of the worker's Python time (py-spy ``--gil``), all of it on the
consumer's event loop, which every message passes through.

This channel builds its client once per connection pool and reuses it, in the worker and
in :class:`producer.InferenceClient`'s sends. A redis-py client is safe to share between
threads: each command or pipeline takes its own connection from the pool. Everything
else (the message format, the unacked bookkeeping, redelivery after the visibility
timeout) is kombu's, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from kombu.transport import redis as kombu_redis

SCHEMES = {"redis", "rediss"}


class SharedClient:
    """The channel's one client, made again only with a new connection pool."""

    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is not None:
            yield client
            return
        pool = self.pool  # None again after a fork or a disconnect: then it is a new pool
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Channel(SharedClient, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(url: str) -> str | None:
    """The transport class path for Celery's ``broker_transport``, or None for kombu's
    own choice (Sentinel and socket URLs keep their transports)."""
    return f"{__name__}:Transport" if urlparse(url).scheme in SCHEMES else None
