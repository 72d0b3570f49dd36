"""The worker's kombu Redis transport: kombu's, with five changes for the consuming side.

* **Every message is read before kombu builds it.** The BRPOP reply passes
  :func:`wire.decode.decode` first. A message that fails it (not JSON, a body of the wrong
  shape, a header of the wrong type, pickle) is never handed to kombu or Celery: it is
  logged and dropped, and its task, where its id can be read, fails with
  ``InvalidRequest`` (worker/unreadable.py). Broadcast (fanout) messages of the wrong shape
  are dropped too. No message can stop the consumer.
* **Each delivery names its holder.** Beside kombu's ``unacked`` record the transport
  writes the delivery's owner, this process's liveness id, so that survivors hand it back
  within seconds if this process dies (worker/reclaim.py), rather than after the
  visibility timeout.
* **The visibility timeout is the last resort.** kombu's sweep of old unacked messages
  passes over those that name a holder: the reclaimer looks after them.
* **Nothing is handed back while the process lives.** kombu restores every unacked
  message when a channel closes: on a lost Redis connection that would hand back tasks
  still running here (or fail, with Redis down, and stop the worker). Here a closed
  channel keeps them: their tasks go on, and ack through a client of their own once
  Redis answers. What this process drops or leaves behind, the reclaimer hands back.
* **An ack never fails a task.** One that cannot reach Redis is kept and sent again by
  the liveness beacon when Redis answers; so is a message taken whose delivery could not
  be recorded (it goes back to its queue).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from time import time
from typing import Any

import redis
import structlog
from kombu.transport import virtual
from kombu.utils.json import dumps

from producer import broker
from wire import keys
from wire.connect import is_sentinel
from wire.decode import Unreadable, check_envelope, decode

log = structlog.get_logger("worker")


class _Deferred:
    """What could not reach Redis, sent again by the liveness beacon once it answers: acks
    (delivery tag, task id), and messages taken but never recorded (list key, message)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acks: dict[str, str | None] = {}
        self._requeues: list[tuple[str, str]] = []

    def add(self, tag: str, task_id: str | None) -> None:
        with self._lock:
            self._acks[tag] = task_id

    def requeue(self, list_key: str, message: str) -> None:
        with self._lock:
            self._requeues.append((list_key, message))

    def tags(self) -> set[str]:
        with self._lock:
            return set(self._acks)

    def flush(self, client: redis.Redis) -> int:
        with self._lock:
            acks, self._acks = self._acks, {}
            requeues, self._requeues = self._requeues, []
        if not acks and not requeues:
            return 0
        try:
            with client.pipeline(transaction=False) as pipe:
                for tag, task_id in acks.items():
                    _remove(pipe, tag, task_id)
                for list_key, message in requeues:
                    pipe.rpush(list_key, message)  # the head of its queue, where it was taken from
                pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._acks = {**acks, **self._acks}
                self._requeues = requeues + self._requeues
            raise
        if requeues:
            log.warning("transport.requeued", messages=len(requeues))
        return len(acks) + len(requeues)


deferred = _Deferred()


def _remove(pipe: Any, tag: str, task_id: str | None) -> None:
    pipe.zrem(keys.UNACKED_INDEX, tag).hdel(keys.UNACKED, tag).hdel(keys.UNACKED_OWNER, tag)
    if task_id:
        pipe.hdel(keys.REDELIVERIES, task_id)


_open_qos: weakref.WeakSet[QoS] = weakref.WeakSet()


def unacked_tags() -> set[str]:
    """The delivery tags this process has taken on open channels and not yet acked, and
    those whose ack waits for Redis."""
    tags = deferred.tags()
    for qos in list(_open_qos):
        if not qos.channel.closed:
            tags.update(tag for tag in list(qos._delivered) if tag not in qos._dirty)
    return tags


class QoS(broker.kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _open_qos.add(self)

    def append(self, message: Any, delivery_tag: str) -> None:
        from worker.liveness import identity

        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                    self.unacked_key, delivery_tag, record
                ).hset(keys.UNACKED_OWNER, delivery_tag, identity()).execute()
        except (redis.ConnectionError, redis.TimeoutError):
            # taken off its queue but not recorded: it goes back once Redis answers, and is
            # not handed to Celery (raised as the connection error it is)
            queue = delivery["routing_key"]
            deferred.requeue(keys.priority_list(queue, message.properties.get("priority")), dumps(message._raw))
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        task_id = (message.headers or {}).get("id") if message is not None else None
        try:
            with self.pipe_or_acquire() as pipe:
                _remove(pipe, delivery_tag, task_id)
                pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            deferred.add(delivery_tag, task_id)
            log.warning("transport.ack_deferred", tag=delivery_tag, task_id=task_id, error=str(exc))
        virtual.QoS.ack(self, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            return (
                pipe.zrem(self.unacked_index_key, delivery_tag)
                .hdel(self.unacked_key, delivery_tag)
                .hdel(keys.UNACKED_OWNER, delivery_tag)
            )

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's visibility-timeout sweep, for deliveries that name no holder only: those
        that do are the reclaimer's, which never hands back a live worker's."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = time() - self.visibility_timeout
            try:
                with broker.kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    visible = client.zrange(
                        self.unacked_index_key, ceil, 0, desc=True, byscore=True, offset=num and start, num=num
                    )
                    if not visible:
                        return
                    owners = client.hmget(keys.UNACKED_OWNER, visible)
                    for tag, owner in zip(visible, owners):
                        if owner is None:
                            self.restore_by_tag(tag, client)
            except broker.kombu_redis.MutexHeld:
                pass

    def restore_unacked_once(self, stderr: Any = None) -> None:
        """Hand nothing back: the tasks go on here (see the module's docstring)."""
        self._on_collect.cancel()
        self._delivered.restored = True


class _Consuming(broker.SharedClient):
    """The consuming side's changes, for kombu's Redis channel and its Sentinel channel."""

    QoS = QoS
    connection: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery's task queues get the task message's full reading; other queues (control
        # replies) what kombu needs
        self._task_queues = frozenset(self.connection.client.transport_options.get("task_queues") or ())

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, with one client per pool; on a channel closed by a lost connection (whose
        running tasks still ack through it), the worker's own client."""
        if client is None and (self.connection is None or self.connection.client is None):
            from worker.celery_app import app

            yield app.services.redis
            return
        with super().conn_or_acquire(client) as chosen:
            yield chosen

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous)  # type: ignore[misc]
        if asynchronous:  # the client that BRPOPs
            parse = client.parse_response

            def parse_checked(connection: Any, command_name: str, **options: Any) -> Any:
                reply = parse(connection, command_name, **options)
                if command_name == "BRPOP" and reply:
                    return reply if self._readable(*reply) else None
                return reply

            client.parse_response = parse_checked
        return client

    def _readable(self, key: bytes | str, raw: bytes | str) -> bool:
        queue = keys.queue_of_key(key.decode(errors="replace") if isinstance(key, bytes) else key)
        try:
            if queue in self._task_queues:
                decode(raw)
            else:
                check_envelope(raw)
            return True
        except Unreadable as exc:
            from worker.unreadable import refuse

            if queue in self._task_queues:
                refuse(exc, queue=queue, intake="celery")
            else:
                log.error("message.unreadable", reason=exc.reason, queue=queue, intake="celery")
            return False

    def _deliver_fanout_message(self, message: Any, exchange: str) -> Any:
        props = message.get("properties") if isinstance(message, dict) else None
        if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
            log.error("message.unreadable", reason="broadcast message without an envelope", exchange=exchange)
            return False
        return super()._deliver_fanout_message(message, exchange)  # type: ignore[misc]


class Channel(_Consuming, broker.kombu_redis.Channel):
    pass


class SentinelChannel(_Consuming, broker.kombu_redis.SentinelChannel):
    pass


class Transport(broker.kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(broker.kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """Celery's ``broker_transport`` for the worker."""
    return f"{__name__}:{'SentinelTransport' if is_sentinel(url) else 'Transport'}"
