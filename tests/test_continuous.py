"""The continuous-batching scheduler (models/continuous.py) with a fake backend: admission,
slots, cancellation, deadlines and failures, fast and exact. The real backends are tested
against their libraries in tests/test_generate_batched.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from models.compute import ComputeThread
from models.continuous import Scheduler, Sequence
from models.generation import GenerationControl, GenerationParams
from wire.errors import InferenceError, Overloaded, TimeLimitReached

END = 0
WAIT_S = 10.0


class Letters:
    def feed(self, token: int) -> str:
        return chr(ord("a") + token % 26)

    def flush(self) -> str:
        return ""


class FakeModel:
    """Sequence i's tokens are its prompt's first id plus 1, 2, 3, ...; an id of 99 in the
    prompt makes the model end after 3 tokens; ``slow_s`` per step."""

    def __init__(self, slow_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.batch_sizes: list[int] = []
        self.started: list[Sequence] = []
        self.released: list[Sequence] = []
        self.fail_next = False
        self.lock = threading.Lock()

    def start(self, seq: Sequence) -> None:
        self.started.append(seq)
        seq.slot = {"n": 0}

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        self.batch_sizes.append(len(seqs))
        if self.slow_s:
            time.sleep(self.slow_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        out = []
        for seq in seqs:
            seq.slot["n"] += 1
            n = seq.slot["n"]
            ends = 99 in seq.prompt_ids and n > 3
            out.append((seq, END if ends else seq.prompt_ids[0] + n))
        return out

    def release(self, seq: Sequence) -> None:
        self.released.append(seq)
        seq.slot = None

    def reset(self) -> None:
        pass

    def is_end(self, token: int) -> bool:
        return token == END


def make(parallel: int = 2, max_waiting: int = 2, slow_s: float = 0.0) -> tuple[Scheduler, FakeModel]:
    model = FakeModel(slow_s)
    return Scheduler("fake", model, ComputeThread("fake"), parallel, max_waiting), model


def seq(
    first: int, max_tokens: int = 5, stop: list[str] | None = None, deadline_s: float = 60.0, extra: int = 1
) -> Sequence:
    params = GenerationParams(prompt="x", max_tokens=max_tokens, temperature=0.0, stop=stop)
    return Sequence(params, [first, extra], Letters(), time.monotonic() + deadline_s)


def run(scheduler: Scheduler, s: Sequence, control: GenerationControl | None = None) -> Any:
    scheduler.submit(s)
    return scheduler.follow(s, control or GenerationControl())


def in_thread(fn: Any, *args: Any) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    box["thread"] = threading.Thread(target=target)
    box["thread"].start()
    return box


def joined(box: dict[str, Any]) -> Any:
    box["thread"].join(WAIT_S)
    assert not box["thread"].is_alive()
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_generations_are_decoded_together_each_with_its_own_text_and_usage() -> None:
    scheduler, model = make(parallel=3, max_waiting=3, slow_s=0.01)
    boxes = [in_thread(run, scheduler, seq(first, max_tokens=4 + first)) for first in range(3)]
    results = [joined(b) for b in boxes]
    for first, result in enumerate(results):
        expected = "".join(chr(ord("a") + (first + n) % 26) for n in range(1, 5 + first))
        assert (result.text, result.finish_reason) == (expected, "length")
        assert (result.prompt_tokens, result.completion_tokens) == (2, 4 + first)
    assert max(model.batch_sizes) == 3  # decoded together
    assert len(model.released) == 3 and scheduler.load() == (0, 0)


def test_a_model_end_and_a_stop_string_end_a_generation_with_stop() -> None:
    scheduler, _ = make()
    ended = run(scheduler, seq(5, max_tokens=50, extra=99))
    assert (ended.text, ended.finish_reason, ended.completion_tokens) == ("ghi", "stop", 3)  # the end token not counted
    stopped = run(scheduler, seq(0, max_tokens=50, stop=["cd"]))
    assert (stopped.text, stopped.finish_reason, stopped.completion_tokens) == ("b", "stop", 3)


def test_a_full_admission_queue_refuses_with_overloaded() -> None:
    scheduler, _ = make(parallel=1, max_waiting=1, slow_s=0.05)
    running = in_thread(run, scheduler, seq(1, max_tokens=20))
    waiting = in_thread(run, scheduler, seq(2, max_tokens=3))
    deadline = time.monotonic() + WAIT_S
    while scheduler.load() != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Overloaded, match="all 1 slots busy and 1 requests waiting"):
        scheduler.submit(seq(3))
    assert joined(running).finish_reason == "length"
    assert joined(waiting).text == "def"  # served once the slot was free
    assert scheduler.stats()["refused"] == 1


def test_cancelling_one_generation_leaves_the_others_and_frees_its_slot() -> None:
    scheduler, model = make(parallel=2, max_waiting=2, slow_s=0.02)
    cancel = threading.Event()
    control = GenerationControl(should_stop=cancel.is_set)
    victim = in_thread(run, scheduler, seq(0, max_tokens=500), control)
    other = in_thread(run, scheduler, seq(10, max_tokens=20))
    queued = seq(20, max_tokens=3)
    time.sleep(0.2)
    queued_box = in_thread(run, scheduler, queued)
    cancel.set()
    result = joined(victim)
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 500
    assert result.text == "".join(chr(ord("a") + n % 26) for n in range(1, result.completion_tokens + 1))
    assert joined(other).text == "".join(chr(ord("a") + (10 + n) % 26) for n in range(1, 21))
    assert joined(queued_box).text == "vwx" and queued in model.started


def test_a_waiting_generation_cancelled_never_starts() -> None:
    scheduler, model = make(parallel=1, max_waiting=2, slow_s=0.02)
    long = in_thread(run, scheduler, seq(0, max_tokens=40))
    time.sleep(0.1)
    waiting = seq(5)
    cancel = threading.Event()
    box = in_thread(run, scheduler, waiting, GenerationControl(should_stop=cancel.is_set))
    time.sleep(0.1)
    cancel.set()
    result = joined(box)
    assert (result.text, result.finish_reason, result.completion_tokens) == ("", "cancelled", 0)
    assert waiting not in model.started
    joined(long)


def test_deadlines_fail_running_and_waiting_generations_and_free_the_slot() -> None:
    scheduler, model = make(parallel=1, max_waiting=2, slow_s=0.02)
    running = seq(0, max_tokens=10_000, deadline_s=0.3)
    waiting = seq(1, max_tokens=10_000, deadline_s=0.2)
    boxes = [in_thread(run, scheduler, running), in_thread(run, scheduler, waiting)]
    with pytest.raises(TimeLimitReached, match="after"):
        joined(boxes[0])
    with pytest.raises(TimeLimitReached, match="waiting for a slot"):
        joined(boxes[1])
    assert running in model.released and scheduler.load() == (0, 0)
    assert run(scheduler, seq(3, max_tokens=2)).text == "ef"  # the slot serves again


def test_a_failed_step_fails_its_generations_and_the_model_serves_on() -> None:
    scheduler, model = make(parallel=2, slow_s=0.02)
    model.fail_next = True
    with pytest.raises(InferenceError, match="device lost"):
        run(scheduler, seq(0, max_tokens=5))
    assert run(scheduler, seq(0, max_tokens=2)).text == "bc"


def test_a_closed_scheduler_refuses_and_fails_what_waits() -> None:
    scheduler, _ = make(parallel=1, max_waiting=1, slow_s=0.05)
    running = in_thread(run, scheduler, seq(0, max_tokens=30))
    time.sleep(0.1)
    waiting = in_thread(run, scheduler, seq(1))
    time.sleep(0.1)
    scheduler.close()
    with pytest.raises(InferenceError, match="shutting down"):
        joined(waiting)
    with pytest.raises(InferenceError, match="shutting down"):
        scheduler.submit(seq(2))
    assert joined(running).finish_reason == "length"


# -- the transformers backend in-process: rows joining and leaving a KV cache ----------------


def batched_and_alone(
    builder: str, parallel: int, minilm_path: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Any]:
    """A small causal LM (tests/model_builders.py) loaded twice: with ``parallel`` slots,
    and with one (``model.generate``, the oracle)."""
    from models.causal_lm import CausalLMRuntime
    from models.options import CausalLMOptions
    from tests import model_builders

    out = tmp_path_factory.mktemp(builder)
    build = getattr(model_builders, builder)
    path = (
        build(minilm_path, out, chat_template=False) if builder == "build_tiny_causal_lm" else build(minilm_path, out)
    )
    batched = CausalLMRuntime("batched", path, "cpu", CausalLMOptions(parallel=parallel, max_waiting=8))
    alone = CausalLMRuntime("alone", path, "cpu", CausalLMOptions())
    batched.load()
    alone.load()
    return batched, alone


@pytest.mark.parametrize("builder", ["build_tiny_causal_lm", "build_tiny_gemma3"])
def test_cache_rows_joining_and_leaving_give_each_generation_alone(
    builder: str, minilm_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Generations of different prompt lengths and lengths, arriving at different times,
    on a Llama and on a Gemma 3 whose sliding window (6 tokens) they run past: each text
    equals ``model.generate`` for that prompt alone."""
    batched, alone = batched_and_alone(builder, 3, minilm_path, tmp_path_factory)
    words = "river stone cloud music winter garden engine paper silver forest candle".split()
    requests = [
        GenerationParams(prompt=" ".join((words * 2)[: 2 + (5 * i) % 17]), max_tokens=4 + (7 * i) % 19, temperature=0.0)
        for i in range(9)
    ]
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        time.sleep(0.002 * i)
        results[i] = batched.generate(requests[i], GenerationControl())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    try:
        assert batched.scheduler is not None and batched.scheduler.stats()["steps"] < sum(
            r.max_tokens for r in requests
        )
        for i, params in enumerate(requests):
            expected = alone.generate(params, GenerationControl())
            assert (results[i].text, results[i].completion_tokens) == (expected.text, expected.completion_tokens), i
        assert sum(bool(r.text) for r in results.values()) >= len(requests) - 2
        assert max(r.prompt_tokens + r.completion_tokens for r in results.values()) > 3 * 6  # well past the window
    finally:
        batched.close()
        alone.close()


@pytest.mark.parametrize(
    ("lengths", "groups"),
    [
        ([5], [[5]]),
        ([8, 7, 6, 8], [[8, 8, 7, 6]]),  # 32 padded for 29 real tokens
        ([20, 3, 4], [[20], [4, 3]]),  # the short ones are not padded to 20
        ([3000, 2500, 2000], [[3000], [2500], [2000]]),  # over the tokens of one pass
    ],
)
def test_prompts_are_evaluated_together_where_the_padding_costs_little(
    lengths: list[int], groups: list[list[int]]
) -> None:
    from models.causal_lm_rows import prefill_groups

    params = GenerationParams(prompt="x", max_tokens=5, temperature=0.0)
    seqs = [Sequence(params, [1] * n, Letters(), time.monotonic() + 60) for n in lengths]
    assert [[s.prompt_tokens for s in g] for g in prefill_groups(seqs)] == groups


@pytest.mark.parametrize("builder", ["build_tiny_causal_lm", "build_tiny_gemma3"])
def test_cache_rows_prompts_evaluated_together_give_each_generation_alone(
    builder: str, minilm_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Requests that arrive while the model is busy have their prompts evaluated in
    left-padded passes when the model comes free (three prompts of similar length in one, a
    much longer one on its own), and each text still equals ``model.generate`` for that prompt alone."""
    batched, alone = batched_and_alone(builder, 4, minilm_path, tmp_path_factory)
    assert batched._rows is not None
    rows = batched._rows
    passes: list[list[int]] = []  # the prompt lengths of each prompt pass
    prefill = rows._prefill
    rows._prefill = lambda prompts: (passes.append([len(p) for p in prompts]), prefill(prompts))[1]  # type: ignore[method-assign]
    words = "river stone cloud music winter garden engine paper silver forest candle".split()
    # three prompts longer than Gemma's window (6) together, padded; a much longer one alone
    prompts = [" ".join(words[:7]), " ".join(words * 3), " ".join(words[5:11]), " ".join(words[1:9])]
    requests = [GenerationParams(prompt=p, max_tokens=12 + 3 * i, temperature=0.0) for i, p in enumerate(prompts)]
    busy = threading.Event()
    hold = batched.compute.submit(busy.wait, WAIT_S)  # the model is busy while they arrive
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = batched.generate(requests[i], GenerationControl())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while batched.scheduler is not None and batched.scheduler.load() != (0, len(requests)):
            assert time.monotonic() < deadline, "the requests never all waited"
            time.sleep(0.01)
        busy.set()
        hold.result(WAIT_S)
        for t in threads:
            t.join(WAIT_S * 3)
        assert len(results) == len(requests)
        assert sorted(map(len, passes[:2]), reverse=True) == [3, 1]  # similar lengths together, the long one alone
        for i, params in enumerate(requests):
            expected = alone.generate(params, GenerationControl())
            assert (results[i].text, results[i].completion_tokens) == (expected.text, expected.completion_tokens), i
        assert sum(bool(r.text) for r in results.values()) >= len(requests) - 1
        assert min(min(lengths) for lengths in passes[:2] if len(lengths) == 3) > 6  # past the window
    finally:
        busy.set()
        batched.close()
        alone.close()
