"""What every ``generate`` runtime takes and gives, whatever its backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from wire.errors import InferenceError, InvalidRequest, TimeLimitReached


@dataclass(frozen=True)
class GenerationParams:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] | None = None
    seed: int | None = None


@dataclass
class GenerationControl:
    """How the caller steers a running generation.

    ``on_text`` gets each new piece of text as soon as it is final (never half a
    character, never a piece of a stop string); ``should_stop`` is polled between
    tokens and ends the generation with ``finish_reason="cancelled"``; past
    ``deadline`` (a ``time.monotonic()`` value) the generation stops with
    ``TimeLimitReached``.
    """

    on_text: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    deadline: float = field(default_factory=lambda: time.monotonic() + 600.0)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


def check_context(prompt_tokens: int, max_tokens: int, context: int, window: str = "the context window") -> None:
    """Refuse, saying by how much, a request whose prompt and completion cannot fit."""
    needed = prompt_tokens + max_tokens
    if needed > context:
        field_name = "prompt/messages" if prompt_tokens >= context else "max_tokens"
        raise InvalidRequest(
            f"{field_name}: {prompt_tokens} prompt tokens + max_tokens {max_tokens} = {needed} tokens "
            f"exceed {window} of {context} by {needed - context}"
        )


class StopScanner:
    """Cuts streamed text at the first stop string, holding back a possible partial match."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = stops or []
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is now safe to emit."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        # keep the longest tail that could still grow into a stop string
        keep = 0
        for n in range(1, min(self.longest - 1, len(self.pending)) + 1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def wait_for_turn(done: Future[object], started: threading.Event, control: GenerationControl) -> bool:
    """Wait until a generation queued on its model's compute thread starts (another one
    may hold the model). False: it was cancelled while waiting, and will never start."""
    while not started.wait(0.05):
        if done.cancelled():  # dropped when the model closed
            raise InferenceError("generate: the model is shutting down")
        if done.done():  # failed before it could start
            return True
        if control.should_stop() and done.cancel():
            return False
        if time.monotonic() > control.deadline and done.cancel():
            raise TimeLimitReached("generate: time limit reached while waiting for the model")
    return True
