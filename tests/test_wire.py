"""The task-message reader every message passes before a worker touches it
(wire/decode.py): it reads what Celery writes, and refuses, with a reason and the task id
where one can be read, everything a consumer could choke on. Fuzzed with hypothesis."""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.malformed import FIELDS, MALFORMED, RAW_MALFORMED, fuzzed, malformed, valid_envelope
from wire.decode import TaskMessage, Unreadable, decode

QUEUE = "wire-test"
EXAMPLES = int(os.environ.get("WIRE_FUZZ_EXAMPLES", "400"))  # more for a longer hunt


def test_reads_what_celery_send_task_writes(redis_client: Any, redis_url: str) -> None:
    app = Celery("wire-oracle", broker=redis_url, backend="disabled", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    queue = f"{QUEUE}-{uuid.uuid4().hex[:8]}"
    try:
        sent = app.send_task(
            "rerank",
            kwargs={"model": "rr", "query": "q", "documents": ["a", "b"]},
            queue=queue,
            countdown=30,
            expires=600,
            priority=7,
        )
        raw = redis_client.rpop(f"{queue}\x06\x166")  # priority 7 lies on kombu's list for step 6
        assert raw is not None
        message = decode(raw.encode())
        assert (message.name, message.task_id, message.routing_key) == ("rerank", sent.id, queue)
        assert message.kwargs == {"model": "rr", "query": "q", "documents": ["a", "b"]} and message.args == []
        assert message.priority == 7 and message.eta is not None and message.expires > message.eta
        assert not message.uses_canvas
    finally:
        app.close()


def test_reads_the_producer_clients_own_messages() -> None:
    envelope = valid_envelope(QUEUE, "generate", {"model": "lm", "prompt": "hi", "stream": True})
    message = decode(json.dumps(envelope).encode())
    assert message.task_id == envelope["headers"]["id"] and message.name == "generate"
    assert message.kwargs["stream"] is True and message.tag == envelope["properties"]["delivery_tag"]


def test_a_lone_surrogate_in_the_arguments_is_left_for_validation_to_name() -> None:
    """JSON can carry ``\\ud800``; the message is readable, and request validation then
    refuses the argument by name (tasks/schemas.py)."""
    envelope = valid_envelope(QUEUE, "embed", {"model": "minilm", "input": "a\ud800b"})
    assert decode(json.dumps(envelope).encode()).kwargs["input"] == "a\ud800b"


@pytest.mark.parametrize("name", sorted(MALFORMED) + sorted(RAW_MALFORMED))
def test_a_malformed_message_is_unreadable_with_its_task_id(name: str) -> None:
    raw, task_id = malformed(QUEUE, name)
    with pytest.raises(Unreadable) as refused:
        decode(raw)
    assert refused.value.reason
    assert refused.value.task_id == task_id


def test_an_unreadable_message_names_its_task_where_it_can() -> None:
    raw, _ = malformed(QUEUE, "body is an object", task="generate")
    with pytest.raises(Unreadable) as refused:
        decode(raw)
    assert refused.value.task == "generate" and "[args, kwargs, embed]" in refused.value.reason


def _check(raw: bytes) -> None:
    """Either a message every field of which has the type the consumers rely on, or Unreadable."""
    try:
        message = decode(raw)
    except Unreadable as refused:
        assert isinstance(refused.reason, str) and refused.reason
        assert refused.task_id is None or isinstance(refused.task_id, str)
        return
    assert isinstance(message, TaskMessage)
    assert isinstance(message.tag, str) and message.tag
    assert isinstance(message.name, str) and message.name and isinstance(message.task_id, str)
    assert isinstance(message.args, list) and isinstance(message.kwargs, dict) and isinstance(message.embed, dict)
    assert isinstance(message.routing_key, str) and 0 <= message.priority <= 9
    assert message.eta is None or isinstance(message.eta, float)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_envelopes_are_read_or_refused_never_crash(data: st.DataObject) -> None:
    envelope = valid_envelope(QUEUE)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(FIELDS))
        node: Any = envelope
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if data.draw(st.booleans()):
                node[path[-1]] = data.draw(JSON)
            else:
                node.pop(path[-1], None)
    _check(json.dumps(envelope).encode())


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=JSON)
def test_fuzzed_bodies_are_read_or_refused_never_crash(body: Any) -> None:
    envelope = valid_envelope(QUEUE)
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    _check(json.dumps(envelope).encode())


@settings(max_examples=EXAMPLES, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_are_refused(raw: bytes) -> None:
    _check(raw)


def test_seeded_fuzz_messages_for_live_workers_are_read_or_refused() -> None:
    for seed in range(500):
        _check(fuzzed(QUEUE, seed))
