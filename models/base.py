"""The runtime interface: what a loaded model can do, declared up front.

Tasks never check classes; they ask the registry for "a runtime that can rerank" and
call the method named after the capability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

EMBED = "embed"
RERANK = "rerank"
NER = "ner"
CLASSIFY = "classify"
GENERATE = "generate"


@dataclass
class LoadReport:
    """What an operator wants to know about a model once it is up."""

    load_s: float
    warmup_s: float
    device: str
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """A loaded model. Implementations add one method per capability they declare."""

    alias: str
    capabilities: frozenset[str]

    def load(self) -> None:
        """Load weights onto the device. Called once, in the process that serves."""

    def warmup(self) -> None:
        """Run one real inference so the first request pays no lazy-init cost."""

    def close(self) -> None:
        """Release threads and memory."""

    def describe(self) -> dict[str, Any]:
        """Static facts for the start-up log (max length, dtype, context size)."""

    def stats(self) -> dict[str, Any]:
        """Counters since start, for ``celery inspect model_stats``."""
