"""The dynamic batcher and the compute thread (models/batcher.py, models/compute.py), with
fake forward functions standing in for models."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from models.batcher import BatchLimits, DynamicBatcher, plan_batches
from models.compute import ComputeThread, shared_compute_thread
from wire.errors import InferenceError


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
