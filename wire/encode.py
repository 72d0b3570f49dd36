"""Celery task messages as the producer client writes them, straight to a Redis queue.

``Celery.send_task`` costs a web app about 0.5 ms of CPU per message on top of the Redis
``LPUSH`` that carries it (0.62-0.70 ms a send, 0.12-0.13 for the ``LPUSH`` alone):
routing, the producer pool, signals, kombu's entity copies and ``maybe_declare``, the
message object and a second JSON pass. The client's
sends are always the same shape (keyword arguments only, priority 0, no ETA, no canvas),
so it writes that message itself: the same protocol-2 message, in the same envelope
kombu's Redis transport stores (with one more header, ``sent_at``), pushed with one
``LPUSH`` on the queue's list. A worker (Celery's consumer or the bulk intake, both
reading with :func:`wire.decode.decode`) runs the two alike; ``tests/test_messages.py``
compares them field by field with what ``send_task`` writes.

This applies to ``redis://`` and ``rediss://`` brokers, where the queue is a Redis list of
the queue's name; other broker URLs (Sentinel, sockets) go through Celery.
"""

from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from typing import Any

import orjson
from celery.utils.saferepr import saferepr
from kombu.utils.json import dumps as kombu_dumps

# what send_task puts in the body after the arguments when the task has no canvas
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Celery's default argsrepr_maxsize and kwargsrepr_maxsize
REPR_MAXSIZE = 1024


_origin: tuple[int, str] = (0, "")


def origin() -> str:
    """The sender's name in the ``origin`` header, as Celery writes it (``anon_nodename``):
    this process's, also after a fork."""
    global _origin
    pid = os.getpid()
    if _origin[0] != pid:
        _origin = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin[1]


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        # a type orjson does not write (a Decimal, an int beyond 64 bits, a non-string
        # key): kombu's JSON, as send_task would write it
        return kombu_dumps(value).encode()


def task_message(task: str, task_id: str, kwargs: dict[str, Any], queue: str, *, sender: str, reply_to: str) -> bytes:
    """The Redis list entry for ``task(**kwargs)`` on ``queue``: what ``send_task(task,
    kwargs=kwargs, queue=queue, task_id=task_id)`` stores with the JSON serializer."""
    body = _json([[], kwargs, _EMBED])
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": saferepr(kwargs, REPR_MAXSIZE),
            "origin": sender,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            # an extension Celery's messages lack: when it was sent, for the worker's
            # time-in-queue metric (ignored by Celery)
            "sent_at": time.time(),
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            # the default exchange: kombu routes by the queue's name without a lookup
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return _json(envelope)
