"""One message from its pop to its ack, and the states it goes through."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from celery import states


class JobState(StrEnum):
    """Where a job stands. The first three are stored as the task's result; the last three
    are only acked (someone else answered the task, or it is never run)."""

    TAKEN = "TAKEN"  # read, not answered yet (held for its ETA, or in a forward pass)
    SUCCESS = states.SUCCESS
    FAILURE = states.FAILURE
    REVOKED = states.REVOKED
    REFUSED = "REFUSED"  # unreadable: refused (its failure stored then), acked
    TRACED = "TRACED"  # run by Celery's tracer, which stored its result
    DUPLICATE = "DUPLICATE"  # answered before it was delivered again

    @property
    def stored(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED)


@dataclass(eq=False)
class Job:
    """One message, from the pop to its ack."""

    raw: bytes
    key: str  # the list it was taken from
    tag: str | None = None  # recorded in the unacked hash under this tag (None: not recorded)
    received: float = field(default_factory=time.monotonic)
    # from the message (worker/intake/dispatch.py reads it)
    task_id: str | None = None
    name: str | None = None
    queue: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    args: Any = ()
    kwargs: Any = None
    embed: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    eta: float | None = None  # wall-clock seconds
    expires: float | None = None
    redelivered: bool = False
    # its run
    plan: Any = None
    prepared: Any = None
    pending: Any = None  # the batcher's request
    runtime: Any = None
    deadline: float = 0.0
    tokenize_s: float = 0.0
    # its outcome
    state: JobState = JobState.TAKEN
    answered: bool = False  # taken by the completer to be stored and acked (exactly once)
    result: Any = None
    error: BaseException | None = None
    tb: str | None = None
    outcome: str = "error"

    @property
    def settled(self) -> bool:
        return self.state is not JobState.TAKEN

    def settle(
        self,
        state: JobState,
        outcome: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
        tb: str | None = None,
    ) -> None:
        """The one place a job leaves TAKEN, once: what it ends as and what is logged."""
        self.state, self.outcome, self.result, self.error, self.tb = state, outcome, result, error, tb
