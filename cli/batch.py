"""A file's worth of requests through the queues, in chunks, resumable.

The input is cut into chunks of ``chunk`` lines; each chunk is one task (``embed`` takes
a list) or a few (``rerank``: one per line), and up to ``concurrency`` chunks are in
flight. Each finished chunk is written at once to ``<output>.parts/`` (a ``.npy`` or
``.jsonl`` file per chunk), so a run that is interrupted, or that fails on one chunk,
resumes from what is there. The output is assembled, in input order, once every chunk
is in, and the parts removed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Chunk:
    index: int
    start: int  # the input line of its first item
    items: list[Any]


def read_jsonl(path: Path, field: str | None) -> list[Any]:
    """The input's items: each line a JSON value, or with ``field`` the value of that key."""
    items = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            value = json.loads(line)
            if field is not None and isinstance(value, dict):
                if field not in value:
                    raise ValueError(f"{path}:{number}: no {field!r} in {line[:80]!r}")
                value = value[field]
            items.append(value)
    return items


def chunks(items: list[Any], size: int) -> list[Chunk]:
    return [Chunk(n, start, items[start : start + size]) for n, start in enumerate(range(0, len(items), size))]


class Parts:
    """The finished chunks of one output, as files in ``<output>.parts/``."""

    def __init__(self, output: Path, kind: str) -> None:
        self.dir = output.with_name(output.name + ".parts")
        self.kind = kind  # npy | jsonl
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, chunk: Chunk) -> Path:
        return self.dir / f"{chunk.index:08d}.{self.kind}"

    def done(self, chunk: Chunk) -> bool:
        return self.path(chunk).exists()

    def write(self, chunk: Chunk, rows: Any) -> None:
        final = self.path(chunk)
        partial = final.with_suffix(".tmp")
        if self.kind == "npy":
            with partial.open("wb") as f:
                np.save(f, np.asarray(rows, dtype=np.float32))
        else:
            partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        partial.replace(final)  # a part is there whole, or not at all

    def assemble(self, all_chunks: list[Chunk], output: Path) -> None:
        if self.kind == "npy":
            arrays = [np.load(self.path(c)) for c in all_chunks]
            np.save(output, np.concatenate(arrays) if arrays else np.zeros((0, 0), dtype=np.float32))
        else:
            with output.open("w") as out:
                for chunk in all_chunks:
                    out.write(self.path(chunk).read_text())
        shutil.rmtree(self.dir)


def run(
    all_chunks: list[Chunk],
    parts: Parts,
    work: Callable[[Chunk], Any],
    *,
    concurrency: int,
    on_done: Callable[[Chunk, bool], None],
) -> list[tuple[Chunk, BaseException]]:
    """Runs ``work`` on every chunk not done yet, ``concurrency`` at a time, writing each
    result as a part; ``on_done(chunk, resumed)`` after each. Returns the chunks that failed."""
    failed: list[tuple[Chunk, BaseException]] = []
    todo: Iterator[Chunk] = iter(all_chunks)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        running: dict[Future[Any], Chunk] = {}

        def fill() -> None:
            while len(running) < concurrency:
                chunk = next(todo, None)
                if chunk is None:
                    return
                if parts.done(chunk):
                    on_done(chunk, True)
                    continue
                running[pool.submit(work, chunk)] = chunk

        fill()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                chunk = running.pop(future)
                try:
                    parts.write(chunk, future.result())
                    on_done(chunk, False)
                except Exception as exc:  # noqa: BLE001 - reported; the others go on
                    failed.append((chunk, exc))
            fill()
    return failed
