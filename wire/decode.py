"""Reading a Celery task message as kombu's Redis transport stores it in a queue.

Every message a worker takes passes :func:`decode` before kombu, Celery's request code or
the bulk intake's planner touch it (CONTRACT §6, v1.1). A message that is not one this
fleet can run raises :class:`Unreadable`, which carries whatever could still be read of
it (the task id above all), so the worker can fail that task with ``InvalidRequest``
instead of leaving its producer waiting, and go on serving.

What is checked is what the consumers rely on: the envelope kombu builds its ``Message``
from, a JSON body (JSON only: pickle and the like are refused before they are decoded),
the body's shape in Celery's protocol 2 (``[args, kwargs, embed]``) or protocol 1 (a
dict), and the type of every header Celery's request code reads.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import orjson
from celery.utils.time import maybe_iso8601

from wire import keys

JSON = "application/json"
UTF8 = (None, "utf-8", "utf8", "UTF-8")
CANVAS_KEYS = ("callbacks", "errbacks", "chain", "chord")
_OPTIONAL_STR_HEADERS = ("shadow", "group", "parent_id", "root_id", "origin")


class Unreadable(ValueError):
    """A message no worker can run; ``task_id`` and ``task`` are set where they could be read."""

    def __init__(self, reason: str, *, task_id: str | None = None, task: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id
        self.task = task


@dataclass(slots=True)
class TaskMessage:
    """A readable task message: the envelope's parts and the decoded body."""

    tag: str
    exchange: str
    routing_key: str
    priority: int
    name: str
    task_id: str
    headers: dict[str, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None  # seconds since the epoch
    expires: float | None = None

    @property
    def uses_canvas(self) -> bool:
        return any(self.embed.get(k) for k in CANVAS_KEYS)


def loads(data: bytes | str) -> Any:
    """JSON as Celery writes it: orjson, falling back to the standard library for what
    orjson refuses and Python's JSON accepts (NaN, lone surrogates in ``\\u`` escapes,
    which then reach request validation and are refused there, naming the field)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)


def decode(raw: bytes | str) -> TaskMessage:
    """The task message in ``raw`` (one entry of a queue's list), or :class:`Unreadable`."""
    try:
        envelope = loads(raw)
    except (ValueError, TypeError) as exc:  # not JSON, not UTF-8
        raise Unreadable(f"not a JSON message: {exc}") from None
    return decode_envelope(envelope)


def check_envelope(raw: bytes | str) -> None:
    """Only what kombu itself needs to build a message (for queues that carry no tasks:
    Celery's control replies): a JSON object with its properties, delivery tag and
    routing, and a body it can decode."""
    try:
        envelope = loads(raw)
    except (ValueError, TypeError) as exc:
        raise Unreadable(f"not a JSON message: {exc}") from None
    _envelope_parts(envelope, None, None)


def decode_envelope(envelope: Any) -> TaskMessage:
    """:func:`decode` for an envelope already parsed from JSON."""
    if not isinstance(envelope, dict):
        raise Unreadable(f"the message is a JSON {type(envelope).__name__}, not an object")
    headers = envelope.get("headers")
    props = envelope.get("properties")
    correlation_id = _str_or_none(props.get("correlation_id")) if isinstance(props, dict) else None
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise Unreadable(f"headers must be an object, got {type(headers).__name__}", task_id=correlation_id)
    task_id = _str_or_none(headers.get("id")) or correlation_id
    task = _str_or_none(headers.get("task"))

    def unreadable(reason: str) -> Unreadable:
        return Unreadable(reason, task_id=task_id, task=task)

    tag, exchange, routing_key = _envelope_parts(envelope, task_id, task, check_body=False)
    content_type = envelope.get("content-type")
    if content_type != JSON:
        # never decoded: pickle and the like are refused, as the worker's accept list says
        raise unreadable(f"content type {content_type!r} refused: this fleet accepts {JSON} only")
    if envelope.get("content-encoding") not in UTF8:
        raise unreadable(f"content encoding {envelope.get('content-encoding')!r} refused: JSON is UTF-8")
    body = envelope.get("body")
    if not isinstance(body, str):
        raise unreadable("body must be a string")
    encoding = props.get("body_encoding")
    if encoding == "base64":
        try:
            body = base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise unreadable(f"body is not base64: {exc}") from None
    elif encoding is not None:
        raise unreadable(f"body_encoding {encoding!r} unknown (base64 or none)")
    try:
        payload = loads(body)
    except (ValueError, TypeError) as exc:
        raise unreadable(f"body is not JSON: {exc}") from None

    if "task" in headers:  # protocol 2
        if not isinstance(payload, list) or len(payload) != 3:
            raise unreadable("body must be [args, kwargs, embed] (Celery protocol 2)")
        args, kwargs, embed = payload
        fields = headers
    elif isinstance(payload, dict) and "task" in payload:  # protocol 1
        task = _str_or_none(payload.get("task"))
        task_id = task_id or _str_or_none(payload.get("id"))
        args, kwargs, embed = payload.get("args", []), payload.get("kwargs", {}), {}
        fields = payload
    else:
        raise unreadable("not a Celery task message: no task name in headers or body")
    if task is None or not task:
        raise unreadable("the task name must be a non-empty string")
    if task_id is None or not task_id or not isinstance(fields.get("id"), str):
        raise unreadable("the task id must be a non-empty string")
    if not isinstance(args, list):
        raise unreadable(f"args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise unreadable(f"kwargs must be an object, got {type(kwargs).__name__}")
    if embed is None:
        embed = {}
    if not isinstance(embed, dict):
        raise unreadable(f"embed must be an object, got {type(embed).__name__}")
    _check_fields(fields, embed, unreadable)
    try:
        eta = _timestamp(fields.get("eta"))
        expires = _timestamp(fields.get("expires"))
    except (ValueError, TypeError, OverflowError) as exc:
        raise unreadable(f"eta/expires must be ISO 8601 times: {exc}") from None
    return TaskMessage(
        tag=tag,
        exchange=exchange,
        routing_key=routing_key,
        priority=keys.clamp_priority(props.get("priority")),
        name=task,
        task_id=task_id,
        headers=fields,
        args=args,
        kwargs=kwargs,
        embed=embed,
        eta=eta,
        expires=expires,
    )


def _envelope_parts(
    envelope: Any, task_id: str | None, task: str | None, check_body: bool = True
) -> tuple[str, str, str]:
    """The delivery tag, exchange and routing key, checked as kombu's ``Message`` and its
    Redis transport read them (and, with ``check_body``, that the body decodes)."""
    if not isinstance(envelope, dict):
        raise Unreadable(f"the message is a JSON {type(envelope).__name__}, not an object")

    def unreadable(reason: str) -> Unreadable:
        return Unreadable(reason, task_id=task_id, task=task)

    props = envelope.get("properties")
    if not isinstance(props, dict):
        raise unreadable("properties must be an object")
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise unreadable("properties.delivery_tag must be a non-empty string")
    info = props.get("delivery_info")
    if not isinstance(info, dict):
        raise unreadable("properties.delivery_info must be an object")
    exchange, routing_key = info.get("exchange"), info.get("routing_key")
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        raise unreadable("properties.delivery_info must name an exchange and a routing_key (strings)")
    if envelope.get("headers") is not None and not isinstance(envelope["headers"], dict):
        raise unreadable("headers must be an object")
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        raise unreadable("body must be a string")
    encoding = props.get("body_encoding")
    if encoding not in (None, "base64"):
        raise unreadable(f"body_encoding {encoding!r} unknown (base64 or none)")
    if check_body and encoding == "base64" and body:
        try:
            base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise unreadable(f"body is not base64: {exc}") from None
    return tag, exchange, routing_key


def _check_fields(fields: dict[str, Any], embed: dict[str, Any], unreadable: Any) -> None:
    """The headers (or protocol-1 fields) Celery's request code reads, by type."""
    for name in _OPTIONAL_STR_HEADERS:
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise unreadable(f"header {name} must be a string or null")
    retries = fields.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        raise unreadable("header retries must be a non-negative integer")
    limits = fields.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list) and len(limits) == 2 and all(_number_or_none(x) for x in limits)
    ):
        raise unreadable("header timelimit must be [soft, hard], each a number or null")
    if fields.get("ignore_result") is not None and not isinstance(fields["ignore_result"], bool):
        raise unreadable("header ignore_result must be a boolean or null")
    for name in ("callbacks", "errbacks", "chain"):
        value = embed.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(s, dict) for s in value)):
            raise unreadable(f"embed.{name} must be a list of signatures or null")
    if embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        raise unreadable("embed.chord must be a signature or null")


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch from Celery's ISO 8601 ``eta``/``expires`` (naive means UTC),
    parsed as Celery's request code parses them."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__} is not an ISO 8601 string")
    when = maybe_iso8601(value)
    if when is None:  # an empty string: Celery's request code would fail on it
        raise ValueError("an empty string is not a time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
