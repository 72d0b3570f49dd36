"""Limits producers and workers agree on by default (each side may set its own)."""

from __future__ import annotations

TASK_KINDS: tuple[str, ...] = ("embed", "rerank", "ner", "classify", "generate")

# seconds a task of each kind may run on a worker (CONTRACT §6), and so how long a
# producer waits for its result by default
TIME_LIMITS: dict[str, float] = {
    "embed": 60.0,
    "rerank": 60.0,
    "ner": 60.0,
    "classify": 60.0,
    "generate": 600.0,
}

MAX_ITEMS = 2048  # most inputs (texts, documents) in one request
MAX_TEXT_CHARS = 1_000_000  # longest single text, in characters
