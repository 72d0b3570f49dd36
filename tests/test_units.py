"""Fast unit tests of the pieces under the integration tests: settings, batcher, stop
strings, stream ordering. Fake forward functions stand in for models here only."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.batcher import BatchLimits, DynamicBatcher, plan_batches
from models.compute import ComputeThread, shared_compute_thread
from models.generation import StopScanner, check_context
from producer.streams import _Cursor
from wire.errors import InferenceError

# -- settings ----------------------------------------------------------------------------


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> Any:
    from worker.settings import load_settings

    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WORKER_CONFIG", str(path))
    return load_settings()


def test_defaults_serve_the_bundled_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    monkeypatch.delenv("WORKER_CONFIG", raising=False)
    settings = load_settings()
    assert set(settings.hosted) == {"minilm", "gemma"}
    assert settings.queue_of("minilm") == "minilm"
    assert settings.models["gemma"].backend == "llama_cpp"
    assert settings.visibility_timeout > max(settings.time_limits.values())


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("WORKER_SERVE", '["b"]')
    settings = _settings(
        tmp_path,
        monkeypatch,
        {
            "concurrency": 5,
            "models": {"a": {"task": "embed", "source": "x"}, "b": {"task": "ner", "source": "y", "queue": "q"}},
        },
    )
    assert settings.concurrency == 3
    assert list(settings.hosted) == ["b"] and settings.queue_of("b") == "q"


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"models": {"m": {"task": "summarize", "source": "x"}}}, "models.m.task"),
        ({"models": {"m": {"task": "embed"}}}, "models.m.source"),
        ({"models": {"m": {"task": "embed", "source": "x", "max_lenght": 5}}}, "models.m.max_lenght"),
        ({"models": {"m": {"task": "embed", "source": "x.gguf"}}}, "llama_cpp serves only task 'generate'"),
        ({"models": {"m": {"task": "embed", "source": "x", "n_ctx": 512}}}, "n_ctx: not an option of the transformers"),
        ({"models": {"m": {"task": "generate", "source": "x.gguf", "packed": False}}}, "packed: not an option"),
        ({"models": {}}, "registry is empty"),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "serve": ["n"]}, "serve"),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "device": "tpu"}, "device"),
        (
            {
                "models": {"m": {"task": "embed", "source": "x"}},
                "time_limits": {"generate": 100},
                "visibility_timeout": 50,
            },
            "visibility_timeout",
        ),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "concurrency": 0}, "concurrency"),
        ({"modles": {}}, "modles"),
    ],
)
def test_bad_registry_names_the_problem(
    config: dict[str, Any], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.settings import ConfigError

    with pytest.raises(ConfigError, match="invalid worker configuration") as info:
        _settings(tmp_path, monkeypatch, config)
    assert needle in str(info.value)


def test_a_bad_registry_stops_the_worker_at_boot(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"m": {"task": "embed", "source": "x", "batching": {"max_batch_size": 0}}}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin", "WORKER_CONFIG": str(path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "models.m.batching.max_batch_size" in proc.stderr


def test_a_model_that_fails_to_load_stops_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"m": {"task": "embed", "source": str(tmp_path / "nowhere")}}, "device": "cpu"})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin", "WORKER_CONFIG": str(path), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr


# -- batcher -----------------------------------------------------------------------------


def _items(lengths: list[int], tag: int = 0) -> list[dict[str, list[int]]]:
    return [{"input_ids": [tag] * n} for n in lengths]


class FakeForward:
    """Echoes (tag, length) per row and records each batch's shape."""

    def __init__(self, delay: float = 0.0, fail_above: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_above = fail_above
        self.lock = threading.Lock()

    def __call__(self, items: Any) -> list[tuple[int, int]]:
        if self.fail_above is not None and len(items) > self.fail_above:
            raise RuntimeError("CUDA out of memory (simulated)")
        with self.lock:
            self.batches.append([len(i["input_ids"]) for i in items])
        time.sleep(self.delay)
        return [(i["input_ids"][0] if i["input_ids"] else -1, len(i["input_ids"])) for i in items]


def test_plan_batches_respects_rows_and_tokens() -> None:
    lengths = [5, 100, 7, 50, 3, 90, 8, 60]
    batches = plan_batches(lengths, BatchLimits(max_batch_size=3, max_batch_tokens=200))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 200 or len(batch) == 1
    for batch in batches:  # rows of similar length share a batch: none outside lies strictly within its range
        low, high = min(lengths[i] for i in batch), max(lengths[i] for i in batch)
        assert not [j for j in range(len(lengths)) if j not in batch and low < lengths[j] < high]


@pytest.mark.parametrize(
    ("lengths", "padded"),
    [
        # the partial batch is best with the shortest rows: cut from the longest end
        ([40] * 10 + [32] * 54 + [24] * 36, 64 * 40 + 36 * 24),
        # ... or with the longest: cut from the shortest end
        ([40] * 30 + [33] * 6 + [24] * 64, 64 * 24 + 36 * 40),
    ],
)
def test_plan_batches_puts_the_partial_batch_where_it_pads_least(lengths: list[int], padded: int) -> None:
    batches = plan_batches(lengths, BatchLimits(max_batch_size=64, max_batch_tokens=100_000))
    assert sorted(len(b) for b in batches) == [36, 64]
    assert sum(len(b) * max(lengths[i] for i in b) for b in batches) == padded


def test_results_come_back_in_request_order() -> None:
    forward = FakeForward()
    batcher = DynamicBatcher("t", forward, BatchLimits(max_batch_size=4, max_batch_tokens=1000))
    lengths = [9, 1, 30, 4, 4, 17, 2, 8, 11, 5]
    out = batcher.run(_items(lengths, tag=3), timeout=5)
    assert out == [(3, n) for n in lengths]
    assert all(len(b) <= 4 for b in forward.batches) and len(forward.batches) == 3
    batcher.close()


def test_concurrent_requests_share_forward_passes() -> None:
    forward = FakeForward(delay=0.01)
    batcher = DynamicBatcher("t", forward, BatchLimits(max_batch_size=64, max_batch_tokens=10_000, max_wait_ms=50))
    results: dict[int, Any] = {}

    def request(tag: int) -> None:
        with batcher.session():
            results[tag] = batcher.run(_items([tag + 1, tag + 2], tag=tag), timeout=5)

    threads = [threading.Thread(target=request, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == {t: [(t, t + 1), (t, t + 2)] for t in range(16)}
    assert len(forward.batches) < 16  # gathered across requests
    assert batcher.stats.requests == 16 and batcher.stats.rows == 32
    batcher.close()


def test_lone_request_does_not_wait() -> None:
    batcher = DynamicBatcher("t", FakeForward(), BatchLimits(max_wait_ms=500))
    t0 = time.perf_counter()
    with batcher.session():
        batcher.run(_items([3]), timeout=5)
    assert time.perf_counter() - t0 < 0.25  # far below max_wait_ms: nobody else was coming
    batcher.close()


def test_out_of_memory_splits_the_batch() -> None:
    forward = FakeForward(fail_above=2)
    batcher = DynamicBatcher("t", forward, BatchLimits(max_batch_size=8))
    assert batcher.run(_items([4, 4, 4, 4, 4], tag=1), timeout=5) == [(1, 4)] * 5
    assert batcher.stats.splits >= 1 and all(len(b) <= 2 for b in forward.batches)
    batcher.close()


def test_a_failing_forward_fails_the_request_with_inference_error() -> None:
    def broken(items: Any) -> list[Any]:
        raise ValueError("bad weights")

    batcher = DynamicBatcher("t", broken, BatchLimits())
    with pytest.raises(InferenceError, match="bad weights"):
        batcher.run(_items([3]), timeout=5)
    batcher.close()


def test_submit_many_reports_each_request_once_as_it_completes() -> None:
    """``on_done`` fires once per request, with its place in the call: for an empty
    request at once, for the others when their rows are in, or when their pass fails."""
    forward = FakeForward(fail_above=None)
    batcher = DynamicBatcher("t", forward, BatchLimits(max_batch_size=2, max_batch_tokens=1000))
    done: list[tuple[int, bool]] = []
    lock = threading.Lock()
    all_in = threading.Event()

    def on_done(request: Any) -> None:
        with lock:
            done.append((request.index, request.error is None))
            if len(done) == 3:
                all_in.set()

    requests = batcher.submit_many([_items([5, 6, 7], tag=1), [], _items([2], tag=2)], on_done=on_done)
    assert all_in.wait(5)
    assert sorted(done) == [(0, True), (1, True), (2, True)]
    assert [batcher.wait(r, 1) for r in requests] == [[(1, 5), (1, 6), (1, 7)], [], [(2, 2)]]
    batcher.close()

    def broken(items: Any) -> list[Any]:
        raise ValueError("bad weights")

    failing = DynamicBatcher("f", broken, BatchLimits(max_batch_size=1))
    failed: list[int] = []
    request = failing.submit_many([_items([3, 3, 3])], on_done=lambda r: failed.append(r.index))[0]
    assert request.done.wait(5) and isinstance(request.error, InferenceError)
    time.sleep(0.1)  # the request's other batches are skipped, not reported again
    assert failed == [0]
    failing.close()


def test_unbatched_mode_runs_in_the_callers_thread() -> None:
    forward = FakeForward()
    batcher = DynamicBatcher("t", forward, BatchLimits(enabled=False, max_batch_size=2))
    assert batcher.run(_items([1, 2, 3]), timeout=5) == [(0, 1), (0, 2), (0, 3)]
    assert len(forward.batches) == 2


def test_every_forward_pass_runs_on_the_shared_compute_thread() -> None:
    seen: set[str] = set()

    def forward(items: Any) -> list[int]:
        seen.add(threading.current_thread().name)
        return [len(i["input_ids"]) for i in items]

    compute = shared_compute_thread("test-device")
    assert shared_compute_thread("test-device") is compute  # one per name in a process
    for enabled in (True, False):  # batched, and in the callers' threads
        batcher = DynamicBatcher("t", lambda items: compute.run(forward, items), BatchLimits(enabled=enabled))
        threads = [threading.Thread(target=batcher.run, args=(_items([n]), 5)) for n in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert batcher.run(_items([4, 5]), timeout=5) == [4, 5]
        batcher.close()
    assert seen == {"model-test-device_0"}, seen


def test_compute_thread_keeps_context_and_errors_and_refuses_work_once_closed() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    compute = ComputeThread("c")
    var.set("the caller's")
    assert compute.run(var.get) == "the caller's"  # log context (task_id...) goes along
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
    compute.close()
    with pytest.raises(InferenceError, match="shutting down"):
        compute.run(var.get)


# -- generation helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces,stops,text,stopped",
    [
        (["Hello", " wor", "ld"], None, "Hello world", False),
        (["Hello", " wor", "ld. Bye"], ["."], "Hello world", True),
        (["ab", "c<", "/s", ">tail"], ["</s>"], "abc", True),
        (["ab", "c<", "/x"], ["</s>"], "abc</x", False),
        (["x", "EN", "D"], ["END", "STOP"], "x", True),
        (["na", "ï", "ve"], ["ïv"], "na", True),
    ],
)
def test_stop_scanner(pieces: list[str], stops: list[str] | None, text: str, stopped: bool) -> None:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert out == text and scanner.stopped == stopped


def test_context_check_says_by_how_much() -> None:
    check_context(10, 20, 30)
    with pytest.raises(Exception, match="exceed the context window of 30 by 1"):
        check_context(10, 21, 30)


# -- stream ordering ---------------------------------------------------------------------


def test_cursor_orders_dedups_and_stops_at_end() -> None:
    cursor = _Cursor(after_seq=-1)
    msgs = [{"seq": i, "type": "token", "text": str(i)} for i in range(4)] + [{"seq": 4, "type": "end"}]
    assert cursor.offer(msgs[1]) == []  # a gap: held back
    assert cursor.offer(msgs[0]) == msgs[:2]
    assert cursor.offer(msgs[0]) == []  # duplicate
    assert cursor.offer(msgs[2]) + cursor.offer(msgs[3]) + cursor.offer(msgs[4]) == msgs[2:]
    assert cursor.done


def test_cursor_resuming_after_the_end_is_done_at_once() -> None:
    cursor = _Cursor(after_seq=4)
    assert cursor.offer({"seq": 3, "type": "token", "text": "x"}) == []
    assert not cursor.done
    assert cursor.offer({"seq": 4, "type": "end"}) == [] and cursor.done


def test_the_producer_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, producer, producer.streams, producer.client; "
        "heavy = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)


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
    # the worker's is a subclass (worker/transport.py), for the consuming side
    from worker.transport import Transport as WorkerTransport

    assert issubclass(WorkerTransport, Transport)
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


# -- bulk intake -------------------------------------------------------------------------


def test_bulk_intake_takes_only_encoder_only_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = {
        "e": {"task": "embed", "source": "x"},
        "r": {"task": "rerank", "source": "x", "queue": "shared"},
        "g": {"task": "generate", "source": "x.gguf", "queue": "shared"},
        "n": {"task": "ner", "source": "x", "queue": "enc"},
        "c": {"task": "classify", "source": "x", "queue": "enc"},
    }
    assert sorted(_settings(tmp_path, monkeypatch, {"models": models}).bulk_queues()) == ["e", "enc"]
    assert _settings(tmp_path, monkeypatch, {"models": models, "intake": "celery"}).bulk_queues() == []
    assert _settings(tmp_path, monkeypatch, {"models": models, "pool": "prefork"}).bulk_queues() == []


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


def test_bulk_completer_answers_each_job_once_in_the_order_they_finish(redis_url: str) -> None:
    """The completer takes jobs from their group and from their batcher's report, in either
    order, and answers each exactly once; a job with no result at its deadline is answered
    with a time-limit error; it returns once stopped with nothing outstanding."""
    from celery import Celery

    from tasks.schemas import Limits
    from worker.intake import BulkIntake, Job
    from worker.intake.job import JobState

    app = Celery("t", broker=redis_url, backend=redis_url, set_as_current=False)
    intake = BulkIntake(
        app, ["q"], redis_url=redis_url, prefetch=8, time_limits={"embed": 60}, limits=Limits(), hostname="h"
    )
    completer = intake.completer
    flushed: list[list[tuple[str, str | None]]] = []
    completer._flush = lambda jobs: flushed.append([(j.task_id, j.state) for j in jobs])  # type: ignore[method-assign]

    def finish(job: Job) -> None:
        job.settle(JobState.SUCCESS, "ok")

    completer._finish = finish  # type: ignore[method-assign]
    far = time.monotonic() + 60
    early, late, slow, stuck = (Job(raw=b"", key="q", task_id=t, name="embed", deadline=far) for t in "ELSX")
    stuck.deadline = time.monotonic() + 0.2
    completer.inbox.put((early, object()))  # done before its group came
    completer.inbox.put([early, late, slow, stuck])
    completer.inbox.put((late, object()))
    completer.inbox.put((late, object()))  # a second report changes nothing
    thread = threading.Thread(target=completer.run)
    thread.start()
    time.sleep(0.05)
    completer.inbox.put((slow, object()))
    completer.inbox.put(None)
    thread.join(5)
    assert not thread.is_alive()
    answered = [entry for batch in flushed for entry in batch]
    assert sorted(answered) == [("E", "SUCCESS"), ("L", "SUCCESS"), ("S", "SUCCESS"), ("X", "FAILURE")]
    assert answered[-1] == ("X", "FAILURE") and "time limit" in str(stuck.error)
    intake.dispatcher.shutdown()
    intake.source.close()


def test_a_cuda_worker_keeps_cudnn_out_of_attention() -> None:
    """cuDNN's SDPA builds a plan per new batch shape (measured on an H200: 45-60 ms of CPU
    per new shape, against 3.4 ms a forward without it), and a dynamic batcher makes
    hundreds of shapes: a CUDA worker turns it off, a CPU worker leaves torch alone."""
    import torch

    from models.device import prepare_device

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        prepare_device("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        prepare_device("cuda:1")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _attention_paths() -> list:
    """The packed pass's attention paths for short rows here: torch's operations (None), and
    the C kernel where it is built and the CPU has AVX-512."""
    from models.packed import attention_kernel

    return [None] + [kernel for kernel in [attention_kernel()] if kernel is not None]


def _has_avx512() -> bool:
    import platform

    if platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " avx512f " in f"{line} " for line in f)


def test_the_attention_kernel_is_built_where_the_cpu_can_run_it() -> None:
    """The kernel is an optional part of the install (it goes on without a C compiler), so
    a failed build would pass unseen but for this: on x86-64 with AVX-512 it must load."""
    from models.packed import attention_kernel

    if not _has_avx512():
        assert attention_kernel() is None
        return
    assert attention_kernel() is not None, (
        "models/_packed_attention.c was not built: pip install -e . with a C compiler"
    )


@pytest.mark.parametrize(("heads", "size"), [(12, 32), (3, 16), (2, 64), (1, 128)])
def test_the_attention_kernel_equals_torchs_attention(heads: int, size: int) -> None:
    """models/_packed_attention.c against softmax(Q K^T * scale) V per row in torch, on rows
    of 1 to 64 tokens (whole, partial and single 16-lane blocks), on one thread and two; and
    what it refuses it refuses whole."""
    import torch

    from models.packed import Batch, attention_kernel

    kernel = attention_kernel()
    if kernel is None:
        pytest.skip("the attention kernel is not built here or the CPU has no AVX-512")
    torch.manual_seed(heads * size)
    lengths = [1, 2, 15, 16, 17, 33, 47, 64, 5]
    batch, hidden = Batch.of(lengths), heads * size
    qkv = torch.randn(sum(lengths), 3 * hidden) * 2
    scaling = size**-0.5
    expected = torch.empty(sum(lengths), hidden)
    for start, n in zip(batch.starts.tolist(), lengths):
        q, k, v = qkv[start : start + n].view(n, 3, heads, size).permute(1, 2, 0, 3)
        attention = torch.softmax(q @ k.transpose(-1, -2) * scaling, -1) @ v  # [heads, n, size]
        expected[start : start + n] = attention.transpose(0, 1).reshape(n, hidden)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.testing.assert_close(kernel(qkv, batch, heads, size, scaling), expected, atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="refused"):
        kernel(torch.randn(65, 3 * hidden), Batch.of([65]), heads, size, scaling)
    with pytest.raises(RuntimeError, match="refused"):
        kernel(torch.randn(4, 3 * 24), Batch.of([4]), 1, 24, scaling)
    # which models get it: head sizes of whole 16-lane blocks up to 128 (BERT-base: 64)
    assert [n for n in (8, 16, 24, 32, 64, 96, 128, 144, 256) if kernel.takes_head_size(n)] == [16, 32, 64, 96, 128]


def test_the_packed_forward_pass_equals_the_padded_one(minilm_path: str) -> None:
    """models/packed/ against the model's own forward pass and pooling, on rows of very
    different lengths (so most of the padded grid is padding), in every pooling mode."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from models.packed import MATMUL_ATTENTION_WIDTH, PackedBert, available_linears, unpack
    from models.pooling import PoolingConfig, pool

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    texts = ["a", "naïve café — 日本語のテキスト 🚀", "  extra   spaces  ", " ".join(["word"] * 200)]
    encoded = tokenizer(texts, truncation=True, max_length=256)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(texts))]
    padded = tokenizer.pad({"input_ids": encoded["input_ids"]}, return_tensors="pt")

    with torch.inference_mode():
        before = model(**padded)[0]
    packed = PackedBert.for_model(model)
    assert packed is not None
    # Q, K and V fused into one matrix, which the model's own layers now view: not held twice
    query = model.encoder.layer[0].attention.self.query.weight
    assert query.untyped_storage().data_ptr() == packed.qkv[0][0].untyped_storage().data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(**padded)[0], before)
    for gemm in available_linears():
        packed.use(gemm)
        worst = packed.matches(items, dict(padded), atol=1e-5)
        assert worst is not None and worst > 0, gemm  # a real comparison, within float32 rounding
    packed.use("torch")
    # the short rows alone: their attention takes the C kernel where built, else torch's
    # unfused path (the long row above, torch's fused kernel); both are checked
    short = [item for item in items if len(item["input_ids"]) <= MATMUL_ATTENTION_WIDTH]
    assert 2 <= len(short) < len(items) and max(len(item["input_ids"]) for item in items) > MATMUL_ATTENTION_WIDTH
    short_padded = tokenizer.pad({"input_ids": [item["input_ids"] for item in short]}, return_tensors="pt")
    for kernel in _attention_paths():
        packed.kernel = kernel
        worst = packed.matches(short, dict(short_padded), atol=1e-5)
        assert worst is not None and worst > 0, kernel

    hidden, lengths = packed.hidden_states(items)
    assert lengths == [len(ids) for ids in encoded["input_ids"]] and hidden.shape[0] == sum(lengths)
    ours, mask = unpack(hidden, lengths)
    assert torch.equal(mask, padded["attention_mask"])
    with torch.inference_mode():
        theirs = model(**padded)[0]
    for config in (
        PoolingConfig(),
        PoolingConfig(cls=True, mean=False),
        PoolingConfig(mean=False, max=True),
        PoolingConfig(mean=False, mean_sqrt_len=True),
        PoolingConfig(mean=False, last_token=True),
        PoolingConfig(cls=True, mean=True, max=True),
    ):
        expected = pool(config, theirs, padded["attention_mask"])
        torch.testing.assert_close(pool(config, ours, mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["reranker", "ner", "sentiment"])
def test_the_packed_classifier_heads_equal_the_models_own(task: str, test_models: dict[str, str]) -> None:
    """The sequence classifier (its last layer for the first token only) and the token
    classifier, packed, on every GEMM library here, against the model's own forward pass:
    rows of very different lengths, and for the reranker pairs with a truncated document."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from models.packed import MATMUL_ATTENTION_WIDTH, PackedBert, available_linears

    path = test_models[task]
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path).eval()
    texts = ["a", "naïve café — 日本語のテキスト 🚀", "  extra   spaces  ", " ".join(["word"] * 600)]
    if task == "reranker":
        encoded = tokenizer(["which café?"] * len(texts), texts, truncation="only_second", max_length=512)
    else:
        encoded = tokenizer(texts, truncation=True, max_length=512)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(texts))]
    padded = dict(tokenizer.pad(dict(encoded), return_tensors="pt"))
    with torch.inference_mode():
        theirs = model(**padded).logits.numpy()

    packed = PackedBert.for_model(model)
    assert packed is not None and packed.head == ("tokens" if task == "ner" else "first")
    scale = max(1.0, float(np.abs(theirs).max()))
    for gemm in available_linears():
        packed.use(gemm)
        ours = packed.outputs(items)
        assert len(ours) == len(texts)
        for row, (out, n) in enumerate(zip(ours, (len(ids) for ids in encoded["input_ids"]))):
            expected = theirs[row, :n] if task == "ner" else theirs[row]
            assert out.shape == expected.shape
            assert float(np.abs(out - expected).max()) <= 1e-5 * scale, (gemm, row)
        assert packed.matches(items, padded, atol=1e-5) is not None
        # the three short rows alone, on each attention path for short rows
        short = {k: v[:3, : max(len(ids) for ids in encoded["input_ids"][:3])] for k, v in padded.items()}
        assert short["input_ids"].shape[1] <= MATMUL_ATTENTION_WIDTH < padded["input_ids"].shape[1]
        for kernel in _attention_paths():
            packed.kernel = kernel
            assert packed.matches(items[:3], short, atol=1e-5) is not None, (gemm, kernel)


@pytest.mark.parametrize(
    "name",
    [
        "XLMRobertaModel",
        "XLMRobertaForSequenceClassification",
        "XLMRobertaForTokenClassification",
        "RobertaModel",
        "RobertaForSequenceClassification",
        "RobertaForTokenClassification",
    ],
)
def test_the_packed_forward_pass_serves_the_roberta_family(name: str) -> None:
    """RoBERTa and XLM-RoBERTa (bge-reranker, multilingual E5, ...): positions counted from
    the padding id, their own classification head, no token types. A small model with
    random weights against its own forward pass, on rows of 2 to 502 tokens, one of them
    holding the padding id inside its text (which RoBERTa gives the padding position)."""
    import torch
    import transformers

    from models.packed import PackedBert, available_linears

    torch.manual_seed(7)
    config_cls = transformers.XLMRobertaConfig if name.startswith("XLM") else transformers.RobertaConfig
    config = config_cls(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=520,
        pad_token_id=1,
        num_labels=3,
    )
    model = getattr(transformers, name)(config).eval()
    rows = [[0, 5, 6, 7, 2], [0, 9, 1, 11, 12, 13, 2], [0, 2], [0, *(20 + i % 50 for i in range(500)), 2]]
    ids = torch.full((len(rows), max(map(len, rows))), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    packed = PackedBert.for_model(model)
    assert packed is not None
    for gemm in available_linears():
        packed.use(gemm)
        worst = packed.matches(
            [{"input_ids": row} for row in rows], {"input_ids": ids, "attention_mask": mask}, atol=1e-5
        )
        assert worst is not None, gemm
    # the check is real: a wrong position count is caught
    packed.padding_idx = 0
    assert packed.matches([{"input_ids": row} for row in rows], {"input_ids": ids, "attention_mask": mask}) is None


def test_the_packed_forward_pass_in_bfloat16_is_checked_at_bfloat16s_precision(test_models: dict[str, str]) -> None:
    """``dtype: bfloat16`` on a CPU: the packed pass is held to a tolerance of bfloat16's
    rounding (4 epsilons of the outputs' size), not float32's, and still catches a bug."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.packed import PackedBert, available_linears

    path = test_models["reranker"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).eval()
    docs = ["a", "naïve café — 日本語のテキスト 🚀", " ".join(["word"] * 300)]
    encoded = tokenizer(["which café?"] * len(docs), docs, truncation="only_second", max_length=512)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(docs))]
    padded = dict(tokenizer.pad(dict(encoded), return_tensors="pt"))
    packed = PackedBert.for_model(model)
    assert packed is not None and packed.tolerance == 4 * torch.finfo(torch.bfloat16).eps
    checked = []
    for gemm in available_linears():
        packed.use(gemm)
        try:
            worst = packed.matches(items, padded)
        except RuntimeError:  # oneDNN has no bfloat16 GEMM on a CPU without bfloat16 instructions
            assert gemm != "torch"
            continue  # the runtime passes over it the same way (test below, for float16)
        assert worst is not None and worst > 1e-4, gemm  # beyond float32's tolerance, within bfloat16's
        checked.append(gemm)
    assert "torch" in checked
    packed.use("torch")
    packed.embeddings = type(packed.embeddings)(model.config).to(torch.bfloat16).eval()  # untrained embeddings
    assert packed.matches(items, padded) is None


def test_a_float16_model_on_the_cpu_loads_and_serves(test_models: dict[str, str]) -> None:
    """oneDNN has no float16 GEMM on most CPUs: the runtime must pass over that library at
    load (not fail), and serve on another or padded."""
    from models.batcher import BatchLimits
    from models.encoder import EncoderRuntime
    from models.options import EncoderOptions

    runtime = EncoderRuntime(
        "reranker",
        "rerank",
        test_models["reranker"],
        "cpu",
        EncoderOptions(dtype="float16"),
        BatchLimits(),
    )
    runtime.load()
    try:
        assert runtime.packed is None or runtime.packed.linear in ("torch", "onednn")
        half, _ = runtime.rerank("which fox?", ["The quick brown fox.", "A lazy dog."])
    finally:
        runtime.close()
    full = EncoderRuntime("reranker", "rerank", test_models["reranker"], "cpu", EncoderOptions(), BatchLimits())
    full.load()
    try:
        exact, _ = full.rerank("which fox?", ["The quick brown fox.", "A lazy dog."])
    finally:
        full.close()
    assert max(abs(a - b) for a, b in zip(half, exact)) < 0.02


def test_the_packed_forward_pass_keeps_the_faster_gemm_library(minilm_path: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    from models.packed import PackedBert, available_linears
    from models.packed import bert as packed_mod

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    packed = PackedBert.for_model(AutoModel.from_pretrained(minilm_path).eval(), "auto")
    assert packed is not None and packed.linear == "torch"  # until tuned
    encoded = tokenizer(["a short one", "and another, a little longer than that"])
    items = [{"input_ids": ids} for ids in encoded["input_ids"]]
    packed_mod._TUNED.pop(packed.shape, None)
    fastest = packed.tune(items, rounds=2)
    assert set(fastest) == set(available_linears()) and all(ms > 0 for ms in fastest.values())
    assert packed.linear == min(fastest, key=fastest.__getitem__)
    assert packed.tune(items) is fastest  # a second model of this shape: the same choice, not timed again
    with pytest.raises(ValueError, match="not available"):
        packed.use("cublas")


def test_the_packed_attention_grid_zeroes_its_padding_and_reads_back_the_tokens() -> None:
    import torch

    from models.packed import Batch

    batch = Batch.of([3, 1, 2])
    packed = torch.arange(1, 7, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # tokens 1..6
    # the grid starts uninitialised: free a block of its size full of NaNs first, which
    # the allocator hands out again, so the padding comes out as zeros only if it is zeroed
    garbage = torch.full((9, 2), float("nan"))
    del garbage
    grid = batch.to_grid(packed)
    expected = torch.tensor([1, 2, 3, 4, 0, 0, 5, 6, 0], dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    assert torch.equal(grid, expected)
    assert torch.equal(batch.from_grid(grid), packed)
    assert torch.equal(Batch.of([2, 2]).to_grid(packed[:4]), packed[:4])  # no padding at all


def test_the_packed_forward_pass_is_only_for_the_models_it_reimplements() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    from models.packed import PackedBert

    tiny = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert PackedBert.for_model(tiny) is None


def test_an_encoder_only_worker_shortens_openmps_spin_and_leaves_the_rest_alone() -> None:
    """libgomp's default spin kept both cores busy after each forward pass; an encoder-only
    worker shortens it, a worker that generates keeps it (llama.cpp needs it), and an
    operator's own setting always wins."""
    from worker.lifecycle import ENCODER_SPINCOUNT, openmp_spincount
    from worker.settings import WorkerSettings

    def settings(models: dict[str, Any]) -> WorkerSettings:
        return WorkerSettings(models=models, serve=list(models))

    encoders = {"e": {"task": "embed", "source": "x"}, "r": {"task": "rerank", "source": "y"}}
    mixed = {**encoders, "g": {"task": "generate", "source": "model.gguf"}}
    assert openmp_spincount(settings(encoders), {}) == ENCODER_SPINCOUNT
    assert openmp_spincount(settings(mixed), {}) is None
    assert openmp_spincount(settings({"g": {"task": "generate", "source": "lm"}}), {}) is None
    assert openmp_spincount(settings(encoders), {"GOMP_SPINCOUNT": "300000"}) is None
    assert openmp_spincount(settings(encoders), {"OMP_WAIT_POLICY": "ACTIVE"}) is None


_ALLOCATE_IN_A_THREAD = """
import json, sys, threading
import torch
from worker.memory import retain_freed_memory
done = retain_freed_memory({}) if sys.argv[1] == "on" else None
where = {}
def in_heap(address):
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return len(fields) > 5 and fields[5] == "[heap]"
    return False
def forward_like():  # a thread of its own, as the compute thread: a large block and a small one
    blocks = {"64 MiB": torch.ones(64 * 2**20 // 4), "1 MiB": torch.ones(2**20 // 4)}
    for name, block in blocks.items():
        where[name] = in_heap(block.data_ptr())
thread = threading.Thread(target=forward_like)
thread.start()
thread.join()
print(json.dumps({"done": done, "in_heap": where}))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_retained_memory_comes_from_the_main_heap() -> None:
    """worker/memory.py: after ``retain_freed_memory``, a thread's blocks, large and small,
    come from the main heap (``[heap]`` in /proc/self/maps), which keeps what is freed for
    reuse. By default glibc maps the large block on its own (and unmaps it when freed, so
    every forward pass page-faults it in again) and serves the thread's small one from an
    arena of the thread's own (whose heaps are dropped once empty). Measured in the worker
    by ``bench/bench_rerank_ner.py``: 14,830 page faults per 64-passage rerank, against
    218,380 with ``retain_memory: false``."""
    import json

    def run(mode: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", _ALLOCATE_IN_A_THREAD, mode],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
            env={k: v for k, v in __import__("os").environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))},
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    off, on = run("off"), run("on")
    assert on["done"] == {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**30, "applied": True}
    assert on["in_heap"] == {"64 MiB": True, "1 MiB": True}
    assert off["in_heap"] == {"64 MiB": False, "1 MiB": False}


def test_an_operators_own_malloc_settings_win() -> None:
    from worker.memory import operator_setting, retain_freed_memory

    assert operator_setting({}) is None
    assert operator_setting({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    for environ, name in (
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "GLIBC_TUNABLES"),
        ({"MALLOC_ARENA_MAX": "4"}, "MALLOC_ARENA_MAX"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ):
        assert operator_setting(environ) == name
        if sys.platform == "linux":
            assert retain_freed_memory(environ) in (
                {"applied": False, "reason": f"{name} is set"},
                {"applied": False, "reason": "not glibc"},
            )


def test_the_worker_bounds_onednns_primitive_caches_unless_the_operator_did() -> None:
    from worker.lifecycle import ONEDNN_CACHE_CAPACITY, onednn_cache_settings

    both = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_CACHE_CAPACITY, "LRU_CACHE_CAPACITY": ONEDNN_CACHE_CAPACITY}
    assert onednn_cache_settings({}) == both
    assert onednn_cache_settings({"LRU_CACHE_CAPACITY": "1024"}) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert onednn_cache_settings(dict(both, LRU_CACHE_CAPACITY="8")) == {}
