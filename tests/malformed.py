"""Malformed task messages, for the reader's own tests and for pushing at live workers.

``valid_envelope`` is the message ``send_task`` would store; ``MALFORMED`` names the
shapes that stopped workers before (a body that is not ``[args, kwargs, embed]``, a task
header that is a list, ...); ``fuzzed`` makes seeded random ones: fields replaced by
values of any JSON type or removed, bodies that are not base64, not UTF-8 or not JSON.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import random
import uuid
from collections.abc import Callable
from typing import Any

from wire.encode import task_message


def valid_envelope(queue: str, task: str = "embed", kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    kwargs = kwargs if kwargs is not None else {"model": "minilm", "input": "hello"}
    raw = task_message(task, str(uuid.uuid4()), kwargs, queue, sender="tests@malformed", reply_to="r")
    return json.loads(raw)


def encode_body(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _with(envelope: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    out = copy.deepcopy(envelope)
    change(out)
    return out


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(envelope: dict[str, Any]) -> None:
        node = envelope
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def change(envelope: dict[str, Any]) -> None:
        node = envelope
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)

    return change


# name -> (change to a valid envelope, whether its task id can still be read)
MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], bool]] = {
    "body is an object": (_set(("body",), encode_body({"a": 1})), True),
    "body is [1]": (_set(("body",), encode_body([1])), True),
    "body is a string": (_set(("body",), encode_body("args")), True),
    "body is null": (_set(("body",), encode_body(None)), True),
    "body has four parts": (_set(("body",), encode_body([[], {}, {}, {}])), True),
    "kwargs is a list": (_set(("body",), encode_body([[], [1], {}])), True),
    "args is an object": (_set(("body",), encode_body([{}, {}, {}])), True),
    "embed is a list": (_set(("body",), encode_body([[], {"model": "minilm", "input": "x"}, [1]])), True),
    "callbacks is a string": (_set(("body",), encode_body([[], {}, {"callbacks": "x"}])), True),
    "task header is a list": (_set(("headers", "task"), ["embed"]), True),
    "task header is empty": (_set(("headers", "task"), ""), True),
    "id header is a number": (_set(("headers", "id"), 12), True),  # the correlation id still names it
    "no id anywhere": (lambda e: (e["headers"].__setitem__("id", None), e["properties"].pop("correlation_id")), False),
    "headers is a list": (_set(("headers",), [1, 2]), True),  # the correlation id names it
    "eta is a number": (_set(("headers", "eta"), 12.5), True),
    "eta is not a time": (_set(("headers", "eta"), "tomorrow"), True),
    "eta is empty": (_set(("headers", "eta"), ""), True),
    "expires is an object": (_set(("headers", "expires"), {"at": 1}), True),
    "timelimit is a string": (_set(("headers", "timelimit"), "10"), True),
    "timelimit has one part": (_set(("headers", "timelimit"), [10]), True),
    "retries is a string": (_set(("headers", "retries"), "0"), True),
    "properties is a list": (_set(("properties",), []), True),
    "delivery tag is a number": (_set(("properties", "delivery_tag"), 7), True),
    "no delivery tag": (_delete(("properties", "delivery_tag")), True),
    "delivery_info is missing": (_delete(("properties", "delivery_info")), True),
    "routing key is a number": (_set(("properties", "delivery_info", "routing_key"), 5), True),
    "body is not base64": (_set(("body",), "%%% not base64 %%%"), True),
    "body is not UTF-8": (_set(("body",), base64.b64encode(b"\xff\xfe\xfa garbage").decode()), True),
    "body is not JSON": (_set(("body",), base64.b64encode(b"[[], {}, {}").decode()), True),
    "unknown body encoding": (_set(("properties", "body_encoding"), "rot13"), True),
    "pickle content": (_set(("content-type",), "application/x-python-serialize"), True),
    "yaml content": (_set(("content-type",), "application/x-yaml"), True),
    "latin-1 content encoding": (_set(("content-encoding",), "latin-1"), True),
    "body is a number": (_set(("body",), 5), True),
}

# raw entries that are not a JSON object at all (no task id can be read)
RAW_MALFORMED: dict[str, bytes] = {
    "not JSON": b"this is not a message",
    "not UTF-8": b"\xff\xfe\x00garbage\x80",
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"task"',
    "JSON null": b"null",
    "an empty entry": b"",
}


def malformed(queue: str, name: str, task: str = "embed") -> tuple[bytes, str | None]:
    """The named malformed message for ``queue`` and the task id a worker can read from it."""
    if name in RAW_MALFORMED:
        return RAW_MALFORMED[name], None
    change, readable = MALFORMED[name]
    envelope = valid_envelope(queue, task)
    task_id = envelope["headers"]["id"]
    bad = _with(envelope, change)
    return json.dumps(bad).encode(), task_id if readable else None


_JSON_LEAVES: list[Any] = [None, True, 0, -1, 2**40, 1.5, float("nan"), "", "x", "\ud800", [], {}, [None], {"a": None}]
# the fields a mutation replaces or removes
FIELDS: list[tuple[str, ...]] = [
    ("body",),
    ("content-type",),
    ("content-encoding",),
    ("headers",),
    ("headers", "task"),
    ("headers", "id"),
    ("headers", "eta"),
    ("headers", "expires"),
    ("headers", "timelimit"),
    ("headers", "retries"),
    ("headers", "shadow"),
    ("headers", "group"),
    ("headers", "ignore_result"),
    ("properties",),
    ("properties", "delivery_tag"),
    ("properties", "delivery_info"),
    ("properties", "delivery_info", "routing_key"),
    ("properties", "delivery_info", "exchange"),
    ("properties", "body_encoding"),
    ("properties", "priority"),
    ("properties", "correlation_id"),
]
_BODIES: list[Any] = [{"a": 1}, [1], [[], {}], [[], {}, {}, {}], [{}, {}, {}], [[], [], {}], [[], {}, []], "s", None, 3]


def fuzzed(queue: str, seed: int, task: str = "embed") -> bytes:
    """A seeded random mutation of a valid message: one to three fields replaced by a
    value of another JSON type or removed, the body's shape or encoding broken, or bytes
    cut off."""
    rng = random.Random(seed)
    envelope = valid_envelope(queue, task, {"model": "minilm", "input": f"fuzz {seed}"})
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.45:
            path = rng.choice(FIELDS)
            value = rng.choice([*_JSON_LEAVES, "__delete__"])
            with contextlib.suppress(KeyError, TypeError, AttributeError):  # a parent was replaced already
                (_delete(path) if value == "__delete__" else _set(path, value))(envelope)
        elif kind < 0.8:
            envelope["body"] = encode_body(rng.choice(_BODIES))
        else:
            envelope["body"] = rng.choice(
                ["@@@", base64.b64encode(bytes(rng.randrange(256) for _ in range(12))).decode()]
            )
    raw = json.dumps(envelope).encode()
    if rng.random() < 0.1:
        raw = raw[: rng.randrange(len(raw))]
    return raw
