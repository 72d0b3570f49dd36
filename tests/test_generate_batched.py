"""``generate`` with ``parallel`` > 1 (continuous batching) on a real worker: concurrent
greedy requests give each request's text alone (llama-cpp and ``model.generate`` as
oracles), cancelling one stream leaves the others' text alone, a timed-out request frees
its slot, and a full admission queue refuses cleanly.

The GGUF model has 3 slots, the transformers models 4. llama.cpp's CPU kernels compute a
step of 4 rows or more differently from a row alone (with weight repacking, 4 rows go
through the repacked GEMM's 4-row tiles; bench/bench_exactness.py measures it), so a
greedy text can change there; up to 3 rows each row is bitwise what it is alone, and the
texts must match exactly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery import Celery

from tests.conftest import GGUF_CTX, FreshLlama, WorkerProcess, call, queue_name
from tests.test_generate import check_stream, hf_greedy

# the worker's generate time limit: long enough for a request that waits for one other on a
# slow 2-core host (AVX2 only: 33 tok/s for one stream), short enough that 3 streams of
# COUNTING run past it on a fast one (AVX-512: about 30 s for their 960 tokens)
TIME_LIMIT = 15.0
PARALLEL = 4  # slots of the transformers models
GGUF_PARALLEL = 3  # slots of the GGUF model: every step within llama.cpp's exact range
COUNTING = "Count from 1 to 2000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8,"  # runs on, greedy
PROMPTS = [
    "The history of the city of Rome begins",
    "A recipe for bread needs",
    "The three largest planets are",
    "In the morning the fishermen",
    "The rules of chess say that",
    "Water boils when",
    "The old lighthouse keeper",
    "A good night's sleep",
]
CHATS = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a river?"}],
]


def q(alias: str) -> str:
    return queue_name(f"batched-{alias}")


@pytest.fixture(scope="session")
def batched_worker(start_worker: Any, gguf_path: str, tiny_lms: dict[str, str]) -> WorkerProcess:
    models = {
        # slots of GGUF_CTX tokens each, as the oracle's context
        "gemma": {
            "task": "generate",
            "source": gguf_path,
            "n_ctx": GGUF_CTX * GGUF_PARALLEL,
            "n_threads": 2,
            "parallel": GGUF_PARALLEL,
        },
        "tiny": {"task": "generate", "source": tiny_lms["tiny"]},
        "tiny-q": {"task": "generate", "source": tiny_lms["tiny"], "parallel": 2, "max_waiting": 1},
    }
    for alias, spec in models.items():
        spec["queue"] = q(alias)
        spec.setdefault("parallel", PARALLEL)
    return start_worker("batched", models, concurrency=12, time_limits={"generate": TIME_LIMIT})


def model_load(producer: Celery, worker: WorkerProcess, alias: str) -> tuple[int, int]:
    replies = producer.control.broadcast("model_stats", reply=True, timeout=5, destination=[worker.name])
    stats = replies[0][worker.name]["models"][alias]
    return stats["running"], stats["waiting"]


def wait_for_load(producer: Celery, worker: WorkerProcess, alias: str, load: tuple[int, int]) -> None:
    deadline = time.monotonic() + 30
    while model_load(producer, worker, alias) != load:
        assert time.monotonic() < deadline, f"{alias} never reached (running, waiting) = {load}"
        time.sleep(0.05)


def llama_alone(llama: FreshLlama, request: dict[str, Any]) -> tuple[str, str, dict[str, int]]:
    sampling = {"max_tokens": request["max_tokens"], "temperature": 0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    if "messages" in request:
        out = llama.create_chat_completion(messages=request["messages"], stop=request.get("stop"), **sampling)
        choice = out["choices"][0]
        return choice["message"]["content"] or "", choice["finish_reason"], out["usage"]
    out = llama.create_completion(request["prompt"], stop=request.get("stop"), **sampling)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]


def at_once(producer: Celery, alias: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every request, then gather every result (the worker holds them all at once)."""
    sent = [producer.send_task("generate", kwargs={"model": alias, **r}, queue=q(alias)) for r in requests]
    return [s.get(timeout=120) for s in sent]


def in_a_flow(producer: Celery, alias: str, requests: list[dict[str, Any]], held: int) -> list[dict[str, Any]]:
    """Send the requests so that the worker holds ``held`` of them at once, a new one as
    soon as one ends, and gather every result in order. Requests join while the others
    decode, and none waits in the worker for longer than one other generation: on a slow
    host, the last of many requests sent at once would wait out the time limit."""
    waiting, running = list(enumerate(requests)), {}
    results: list[dict[str, Any]] = [{} for _ in requests]
    deadline = time.monotonic() + 180
    while waiting or running:
        while waiting and len(running) < held:
            index, request = waiting.pop(0)
            running[index] = producer.send_task("generate", kwargs={"model": alias, **request}, queue=q(alias))
        ended = [index for index, sent in running.items() if sent.ready()]
        for index in ended:
            results[index] = running.pop(index).get(timeout=10)
        if not ended:
            assert time.monotonic() < deadline, f"{len(running) + len(waiting)} requests still not served"
            time.sleep(0.02)
    return results


def test_concurrent_greedy_gguf_requests_each_equal_llama_cpp_alone(
    batched_worker: Any, producer: Celery, llama: FreshLlama
) -> None:
    # more requests than slots, of different lengths: they join and leave at different
    # steps, and one at a time waits for a slot
    requests: list[dict[str, Any]] = [
        {"prompt": p, "max_tokens": 12 + 7 * (i % 4), "temperature": 0} for i, p in enumerate(PROMPTS)
    ]
    requests += [{"messages": m, "max_tokens": 32, "temperature": 0} for m in CHATS]
    requests[2]["stop"] = ["."]
    results = in_a_flow(producer, "gemma", requests, held=GGUF_PARALLEL + 1)
    texts = 0
    for request, result in zip(requests, results, strict=True):
        text, finish_reason, usage = llama_alone(llama, request)
        assert result["text"] == text, request
        assert result["finish_reason"] == finish_reason
        assert result["usage"] == usage
        texts += bool(text)
    assert texts >= len(PROMPTS)


def test_concurrent_greedy_transformers_requests_each_equal_model_generate(
    batched_worker: Any, producer: Celery, tiny_lms: dict[str, str]
) -> None:
    requests = [{"prompt": p, "max_tokens": 10 + 5 * (i % 5), "temperature": 0} for i, p in enumerate(PROMPTS)]
    results = at_once(producer, "tiny", requests)
    for request, result in zip(requests, results, strict=True):
        text, tokens = hf_greedy(tiny_lms["tiny"], request["prompt"], request["max_tokens"])
        assert result["text"] == text and text
        assert result["usage"]["completion_tokens"] == tokens


@pytest.mark.parametrize("alias", ["gemma", "tiny"])
def test_each_request_keeps_its_own_sampling_settings(alias: str, batched_worker: Any, producer: Celery) -> None:
    greedy = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
    sampled = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 1.5, "top_k": 50, "seed": 3}
    alone = call(producer, "generate", q(alias), model=alias, **greedy)
    together = at_once(producer, alias, [greedy, sampled, greedy])
    assert together[0]["text"] == together[2]["text"] == alone["text"]
    assert together[1]["text"] != alone["text"] and together[1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("alias", ["gemma", "tiny"])
def test_cancelling_one_stream_leaves_the_others_text_unchanged(
    alias: str, batched_worker: Any, client: Any, producer: Celery
) -> None:
    requests = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in PROMPTS[:3]]
    alone = [call(producer, "generate", q(alias), model=alias, **r)["text"] for r in requests]
    victim = client.stream_generate(alias, queue=q(alias), prompt=COUNTING, max_tokens=900, temperature=0)
    first = next(victim)
    with ThreadPoolExecutor(3) as pool:
        streams = [
            pool.submit(lambda r=r: list(client.stream_generate(alias, queue=q(alias), timeout=60, **r)))
            for r in requests
        ]
        time.sleep(0.3)
        client.cancel(first["task_id"])
        rest = list(victim)
        gathered = [s.result(timeout=60) for s in streams]
    assert rest[-1]["type"] == "end" and rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["usage"]["completion_tokens"] < 900
    assert [check_stream(messages) for messages in gathered] == alone


def test_a_timed_out_request_frees_its_slot(batched_worker: Any, client: Any, producer: Celery, llama: Any) -> None:
    """Every slot taken by a generation that runs past the time limit: each fails with
    TimeLimitReached (its stream with an error), and the slots serve the next request."""
    sent = [
        client.send(
            "generate", model="gemma", queue=q("gemma"), prompt=COUNTING, max_tokens=GGUF_CTX - 64, temperature=0
        )
        for _ in range(GGUF_PARALLEL)
    ]
    for task_id in sent:
        with pytest.raises(Exception) as info:
            producer.AsyncResult(task_id).get(timeout=TIME_LIMIT + 30)
        assert type(info.value).__name__ == "TimeLimitReached"
    wait_for_load(producer, batched_worker, "gemma", (0, 0))
    request = {"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0}
    started = time.monotonic()
    result = call(producer, "generate", q("gemma"), model="gemma", **request)
    assert result["text"] == llama_alone(llama, request)[0]
    assert time.monotonic() - started < TIME_LIMIT


def test_a_full_admission_queue_refuses_and_the_task_is_retried(
    batched_worker: Any, client: Any, producer: Celery, tiny_lms: dict[str, str]
) -> None:
    """tiny-q: 2 slots and 1 place to wait. A fourth request is refused (Overloaded), goes
    back to its queue (Celery's retry) and is served once there is room."""
    long = {"prompt": COUNTING, "max_tokens": 1200, "temperature": 0}
    holders = [client.send("generate", model="tiny-q", queue=q("tiny-q"), **long) for _ in range(2)]
    wait_for_load(producer, batched_worker, "tiny-q", (2, 0))
    waiter = client.send("generate", model="tiny-q", queue=q("tiny-q"), prompt=PROMPTS[0], max_tokens=10, temperature=0)
    wait_for_load(producer, batched_worker, "tiny-q", (2, 1))
    refused = client.send(
        "generate", model="tiny-q", queue=q("tiny-q"), prompt=PROMPTS[1], max_tokens=10, temperature=0
    )
    deadline = time.monotonic() + 30
    while not any(
        e.get("event") == "task.done" and e.get("task_id") == refused and e.get("outcome") == "retry"
        for e in batched_worker.events()
    ):
        assert time.monotonic() < deadline, "the fourth request was never refused"
        time.sleep(0.05)
    expected = {t: hf_greedy(tiny_lms["tiny"], p, 10)[0] for t, p in ((waiter, PROMPTS[0]), (refused, PROMPTS[1]))}
    # the holders have done their part; cancelling them (not waiting out 1200 tokens)
    # keeps the test inside the time limit on a slow host
    for task_id in holders:
        client.cancel(task_id)
    for task_id in holders:
        held = producer.AsyncResult(task_id).get(timeout=60)
        assert held["finish_reason"] == "cancelled" and 0 < held["usage"]["completion_tokens"] < 1200
    for task_id, text in expected.items():
        assert producer.AsyncResult(task_id).get(timeout=60)["text"] == text
    assert batched_worker.alive()
