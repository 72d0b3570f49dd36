"""Redis clients for the fleet's URLs: ``redis://`` and ``rediss://`` as redis-py reads
them, and ``sentinel://`` as Celery documents it.

A Sentinel URL names the sentinels, ``;``-separated, each with its port, and optionally
the database and the master's password:
``sentinel://:password@host1:26379/0;sentinel://host2:26379``. The master's name comes
apart (``master_name``), as in Celery's ``broker_transport_options``. A client made here
asks the sentinels for the master on every new connection, so after a failover it
reconnects to the promoted replica by itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL = "sentinel"


def is_sentinel(url: str) -> bool:
    return url.partition("://")[0] == SENTINEL


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' addresses, and the master's ``db``, ``password`` and ``username``."""
    hosts: list[tuple[str, int]] = []
    options: dict[str, Any] = {"db": 0}
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        if parsed.scheme != SENTINEL or not parsed.hostname:
            raise ValueError(f"not a sentinel:// address: {part!r}")
        hosts.append((parsed.hostname, parsed.port or 26379))
        if parsed.password:
            options["password"] = unquote(parsed.password)
        if parsed.username:
            options["username"] = unquote(parsed.username)
        if parsed.path.strip("/").isdigit():
            options["db"] = int(parsed.path.strip("/"))
    return hosts, options


def client(url: str, master_name: str | None = None, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` (``kwargs``: redis-py's, such as ``socket_timeout``)."""
    return _connect(redis.Redis, Sentinel, url, master_name, kwargs)


def async_client(url: str, master_name: str | None = None, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of :func:`client`."""
    return _connect(aioredis.Redis, AsyncSentinel, url, master_name, kwargs)


def _connect(redis_cls: Any, sentinel_cls: Any, url: str, master_name: str | None, kwargs: dict[str, Any]) -> Any:
    if not is_sentinel(url):
        return redis_cls.from_url(url, **kwargs)
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name")
    hosts, options = sentinel_parts(url)
    sentinels = sentinel_cls(hosts, socket_timeout=kwargs.get("socket_timeout", 5), socket_connect_timeout=2)
    return sentinels.master_for(master_name, **options, **kwargs)
