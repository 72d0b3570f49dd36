"""Redis bookkeeping as kombu keeps it: the producer's and the worker's transports
(producer/broker.py, worker/transport.py) and the bulk intake's pop (worker/lua/pop.lua)."""

from __future__ import annotations

from typing import Any


def test_broker_channel_reuses_one_client_and_keeps_kombus_unacked_bookkeeping(redis_url: str) -> None:
    import uuid

    import redis
    from kombu import Connection

    from producer import InferenceClient
    from producer.broker import Transport, transport_for
    from worker.celery_app import celery_config
    from worker.settings import load_settings

    assert transport_for("redis://h:6379/0") == transport_for("rediss://h:6380/1") == "producer.broker:Transport"
    assert transport_for("sentinel://h:26379") is None
    # the worker's channels share the producer's one-client channel (worker/transport.py)
    from producer.broker import SharedClient
    from worker.transport import Transport as WorkerTransport

    assert issubclass(WorkerTransport.Channel, SharedClient)
    assert celery_config(load_settings(redis_url=redis_url))["broker_transport"] == "worker.transport:Transport"
    client = InferenceClient(redis_url)
    try:
        assert client.celery.connection_for_write().transport_cls == "producer.broker:Transport"
    finally:
        client.close()

    check = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport=Transport, transport_options={"visibility_timeout": 60}) as conn:
        queue = conn.SimpleQueue(f"test-broker-{uuid.uuid4().hex}", no_ack=False)
        try:
            channel = queue.channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1}
            # delivered, not yet acked: recorded for redelivery, as kombu does
            assert check.hexists(channel.unacked_key, message.delivery_tag)
            message.ack()
            assert not check.hexists(channel.unacked_key, message.delivery_tag)
            channel._disconnect_pools()  # as after a fork or a lost connection: a new pool
            with channel.conn_or_acquire() as third:
                assert third is not first and third.connection_pool is channel.pool
        finally:
            queue.queue.delete()
            queue.close()
            check.close()


def test_bulk_pop_records_messages_as_kombu_does_so_kombu_can_restore_them(redis_url: str) -> None:
    """The pop script takes messages from a queue's priority lists in kombu's order and
    files each in kombu's unacked hash in kombu's own format: kombu's restore then puts
    the very same message back on its list."""
    import json
    import uuid

    import redis
    from celery import Celery
    from kombu import Exchange, Queue

    from wire.keys import UNACKED, UNACKED_INDEX, UNACKED_OWNER, priority_keys
    from worker.intake.source import POP_SCRIPT

    UNACKED_KEY, UNACKED_INDEX_KEY = UNACKED, UNACKED_INDEX  # noqa: N806

    name = f"test-intake-{uuid.uuid4().hex}"
    app = Celery("t", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", broker_transport_options={"visibility_timeout": 60})
    check = redis.Redis.from_url(redis_url)
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    popped: list[dict[str, Any]] = []
    try:
        with app.connection_for_write() as conn:
            queue(conn.default_channel).declare()
        ids = [app.send_task("embed", kwargs={"n": i}, queue=queue, priority=p).id for i, p in enumerate((0, 9, 0))]
        keys = priority_keys(name)
        assert check.llen(keys[0]) == 2 and check.llen(keys[3]) == 1
        holder = f"test-holder-{uuid.uuid4().hex}"
        got = check.register_script(POP_SCRIPT)(
            keys=[UNACKED_KEY, UNACKED_INDEX_KEY, UNACKED_OWNER, *keys], args=[10, holder]
        )
        popped = [json.loads(got[k + 1]) for k in range(0, len(got), 3)]
        assert [m["headers"]["id"] for m in popped] == [ids[0], ids[2], ids[1]]  # priority 0 first, FIFO
        assert [int(got[k]) for k in range(0, len(got), 3)] == [1, 1, 4]
        # each with its delivery tag, filed under this holder for the reclaimer
        assert [got[k + 2].decode() for k in range(0, len(got), 3)] == [m["properties"]["delivery_tag"] for m in popped]
        assert all(check.hget(UNACKED_OWNER, m["properties"]["delivery_tag"]) == holder.encode() for m in popped)
        assert all(check.llen(k) == 0 for k in keys)
        for message in popped:
            tag = message["properties"]["delivery_tag"]
            entry = json.loads(check.hget(UNACKED_KEY, tag))
            info = message["properties"]["delivery_info"]
            assert entry == [message, info["exchange"], info["routing_key"]]  # as kombu's QoS.append files it
            assert check.zscore(UNACKED_INDEX_KEY, tag) is not None
        # kombu's own restore (what any worker's sweep runs after a crash) hands them back
        with app.connection_for_read() as conn:
            qos = conn.default_channel.qos
            for message in popped:
                qos.restore_by_tag(message["properties"]["delivery_tag"], leftmost=True)
        restored = [json.loads(raw) for k in keys for raw in check.lrange(k, 0, -1)]
        assert sorted(m["headers"]["id"] for m in restored) == sorted(ids)
        assert {m["body"] for m in restored} == {m["body"] for m in popped}
        assert not any(check.hexists(UNACKED_KEY, m["properties"]["delivery_tag"]) for m in popped)
    finally:
        if popped:
            check.hdel(UNACKED_OWNER, *[m["properties"]["delivery_tag"] for m in popped])
        check.delete(*priority_keys(name))
        check.close()
        app.close()
