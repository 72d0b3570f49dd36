"""Continuous batching for ``generate``: a model's concurrent generations decoded together.

A generation model with ``parallel: N`` (N > 1) has N slots. Each step of its loop is one
forward pass over every running generation: a request takes a free slot at the next
step boundary (its prompt evaluated in that step), and gives it back the moment it
ends, is cancelled or runs out of time, so the others never wait for a whole answer.
A request that finds every slot taken waits in a bounded admission queue; one that
finds that queue full too is refused with ``Overloaded`` (a ``TransientError``: the
task goes back to its queue for a worker with room).

The backend (models/gguf_slots.py for llama.cpp, models/causal_lm_rows.py for
transformers) does the forward passes and the sampling; this module does the rest,
the same for both: admission, per-request stop strings, ``max_tokens``, cancellation,
deadlines, the text handed to each request, and usage counts.

The loop runs on the model's compute thread (models/compute.py) while any generation
is admitted, and the request's own thread follows its generation through a queue of
events (pieces of text, then the result or an error): publishing a piece to Redis never
holds up the other generations' next step.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from models.compute import ComputeThread
from models.generation import GenerationControl, GenerationParams, GenerationResult, StopScanner
from wire.errors import InferenceError, Overloaded, TimeLimitReached

log = structlog.get_logger(__name__)

POLL_S = 0.05  # how often a request's thread looks for its cancellation while it waits


class TextDecoder(Protocol):
    """Token ids to text for one generation, piece by piece (never half a character)."""

    def feed(self, token: int) -> str: ...
    def flush(self) -> str: ...


class Backend(Protocol):
    """A model that steps several generations at once."""

    def start(self, seq: Sequence) -> None:
        """``seq`` has a slot: set up its sampler and whatever it holds in the model."""

    def step(self, seqs: list[Sequence]) -> Iterable[tuple[Sequence, int]]:
        """One forward pass over ``seqs`` (each running): the tokens sampled, in order
        (a generation may get none while its prompt is still being evaluated, or two)."""

    def release(self, seq: Sequence) -> None:
        """``seq`` has ended: free its slot."""

    def reset(self) -> None:
        """After a failed step: free every slot."""

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (the model's end of text or turn)."""


class SeqState(enum.Enum):
    WAITING = "waiting"  # in the admission queue
    RUNNING = "running"  # holds a slot
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    """One generation in a model's batch."""

    params: GenerationParams
    prompt_ids: list[int]
    decoder: TextDecoder
    deadline: float
    extra_stops: list[str] = field(default_factory=list)  # a chat format's own stop strings
    state: SeqState = SeqState.WAITING
    completion_tokens: int = 0
    cancel_requested: bool = False  # set by the request's thread, read by the loop
    slot: Any = None  # the backend's per-generation state
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    pieces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scanner = StopScanner([*(self.params.stop or []), *self.extra_stops])

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Scheduler:
    """The slots, the admission queue and the step loop of one model."""

    def __init__(self, name: str, backend: Backend, compute: ComputeThread, parallel: int, max_waiting: int) -> None:
        self.name = name
        self.backend = backend
        self.compute = compute
        self.parallel = parallel
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._looping = False  # a loop job is queued or running on the compute thread
        self._closed = False
        self.steps = 0
        self.refused = 0

    # -- the request's side -----------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """Generations running (holding a slot) and waiting for one."""
        return len(self._running), len(self._waiting)

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._closed:
                raise InferenceError(f"model {self.name} is shutting down")
            free = self.parallel - len(self._running)
            if len(self._waiting) >= free + self.max_waiting:
                self.refused += 1
                raise Overloaded(
                    f"model {self.name}: all {self.parallel} slots busy and {len(self._waiting)} requests waiting "
                    f"(max_waiting {self.max_waiting})"
                )
            self._waiting.append(seq)
            if not self._looping:
                self._looping = True
                self.compute.submit(self._loop)

    def follow(self, seq: Sequence, control: GenerationControl) -> GenerationResult:
        """Hand ``seq``'s text to ``control.on_text`` as it comes, pass on its
        cancellation, and return its result (or raise its error)."""
        try:
            while True:
                try:
                    item = seq.events.get(timeout=POLL_S)
                except queue.Empty:
                    item = None
                if isinstance(item, str):
                    if control.on_text is not None:
                        control.on_text(item)
                elif isinstance(item, GenerationResult):
                    return item
                elif isinstance(item, BaseException):
                    raise item
                if not seq.cancel_requested and control.should_stop():
                    seq.cancel_requested = True
        except BaseException:
            seq.cancel_requested = True  # nobody follows it any more: free its slot
            raise

    # -- the loop, on the model's compute thread -----------------------------------------

    def _loop(self) -> None:
        structlog.contextvars.clear_contextvars()  # not the first request's context
        while True:
            with self._lock:
                self._admit()
                if not self._running:
                    self._looping = False
                    return
                batch = list(self._running)
            now = time.monotonic()
            for seq in batch:
                if seq.cancel_requested:
                    self._finish(seq, "cancelled")
                elif now > seq.deadline:
                    self._fail(
                        seq, TimeLimitReached(f"generate: time limit reached after {seq.completion_tokens} tokens")
                    )
            batch = [seq for seq in batch if seq.state is SeqState.RUNNING]
            if not batch:
                continue
            try:
                for seq, token in self.backend.step(batch):
                    self._advance(seq, token)
            except Exception as exc:  # noqa: BLE001 - the model failed: its generations fail, the loop goes on
                log.error("generate.step_failed", model=self.name, exc_info=exc)
                error = InferenceError(f"generate failed: {type(exc).__name__}: {exc}")
                for seq in batch:
                    if seq.state is SeqState.RUNNING:
                        self._fail(seq, error, release=False)
                self.backend.reset()
            self.steps += 1
            self.compute.progress()

    def _admit(self) -> None:
        """(under the lock) Drop waiting requests that were cancelled or ran out of time;
        give free slots to the rest, first come first served."""
        now = time.monotonic()
        kept: deque[Sequence] = deque()
        for seq in self._waiting:
            if seq.cancel_requested:
                seq.state = SeqState.DONE
                seq.events.put(GenerationResult("", "cancelled", seq.prompt_tokens, 0))
            elif now > seq.deadline:
                seq.state = SeqState.DONE
                seq.events.put(TimeLimitReached("generate: time limit reached while waiting for a slot"))
            else:
                kept.append(seq)
        self._waiting = kept
        while self._waiting and len(self._running) < self.parallel:
            seq = self._waiting.popleft()
            try:
                self.backend.start(seq)
            except Exception as exc:  # noqa: BLE001 - this request only
                seq.state = SeqState.DONE
                seq.events.put(InferenceError(f"generate failed: {type(exc).__name__}: {exc}"))
                continue
            seq.state = SeqState.RUNNING
            self._running.append(seq)

    def _advance(self, seq: Sequence, token: int) -> None:
        if seq.state is not SeqState.RUNNING:
            return  # ended earlier in this step; the token is dropped
        if self.backend.is_end(token):
            self._finish(seq, "stop")  # the end-of-text token is not part of the text
            return
        seq.completion_tokens += 1
        self._emit(seq, seq.scanner.feed(seq.decoder.feed(token)))
        if seq.scanner.stopped:
            self._finish(seq, "stop")
        elif seq.completion_tokens >= seq.params.max_tokens:
            self._finish(seq, "length")

    @staticmethod
    def _emit(seq: Sequence, text: str) -> None:
        if text:
            seq.pieces.append(text)
            seq.events.put(text)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._emit(seq, seq.scanner.feed(seq.decoder.flush()))
        self._emit(seq, seq.scanner.flush())
        self._end(seq)
        seq.events.put(GenerationResult("".join(seq.pieces), reason, seq.prompt_tokens, seq.completion_tokens))

    def _fail(self, seq: Sequence, error: BaseException, release: bool = True) -> None:
        self._end(seq, release)
        seq.events.put(error)

    def _end(self, seq: Sequence, release: bool = True) -> None:
        seq.state = SeqState.DONE
        if release:
            self.backend.release(seq)
        with self._lock:
            self._running.remove(seq)

    def close(self) -> None:
        """Refuse new requests; waiting ones fail (the compute thread is closing)."""
        with self._lock:
            self._closed = True
            for seq in self._waiting:
                seq.state = SeqState.DONE
                seq.events.put(InferenceError(f"model {self.name} is shutting down"))
            self._waiting.clear()

    def stats(self) -> dict[str, Any]:
        running, waiting = self.load()
        return {
            "parallel": self.parallel,
            "running": running,
            "waiting": waiting,
            "steps": self.steps,
            "refused": self.refused,
        }
