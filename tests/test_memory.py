"""A worker's memory stays flat under steady load (worker/memory.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerProcess, queue_name

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

_KEEP_AND_TRIM = """
import json
from worker.memory import TrimWatch, _rss, retain_freed_memory
retain_freed_memory({})
watch = TrimWatch(slack=64 * 2**20)
quiet = watch.check()  # nothing has grown yet
block = bytearray(256 * 2**20)  # from the heap (no mapped blocks), touched
del block  # freed, and kept: the trim threshold is 1 GiB
kept = _rss() - watch.floor
trimmed = watch.check()
print(json.dumps({"quiet": quiet, "kept_mib": kept / 2**20, "trimmed": trimmed, "left_mib": (_rss() - watch.floor) / 2**20}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_handed_back_past_the_slack() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KEEP_AND_TRIM],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])  # after the watch's own log line
    assert out["quiet"] is False
    assert out["kept_mib"] > 200, "the freed block was not kept: the test shows nothing"
    assert out["trimmed"] is True and out["left_mib"] < 16


def test_rss_levels_off_under_steady_one_sentence_load(start_worker: Any, minilm_path: str, redis_url: str) -> None:
    """6,000 one-sentence embeds from 32 threads, default settings: the worker's RSS grows
    by less than 10% of its level after the first 3,000 over the next 3,000."""
    from producer import InferenceClient

    queue = queue_name("soak")
    worker: WorkerProcess = start_worker("soak", {"minilm": {"task": "embed", "source": minilm_path, "queue": queue}})
    client = InferenceClient(redis_url)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    lock = threading.Lock()
    sent = [0]
    rss: dict[int, float] = {}
    failures: list[BaseException] = []

    def producer(k: int) -> None:
        while True:
            with lock:
                i = sent[0]
                if i >= 6000 or failures:
                    return
                sent[0] += 1
            text = " ".join(words[(i * j + k) % len(words)] for j in range(3 + i % 25)) + f" {i}"
            try:
                client.embed("minilm", text, queue=queue, timeout=60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return
            if i + 1 in (3000, 6000):
                rss[i + 1] = worker.rss_mb()

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    client.close()
    assert not failures, failures[:3]
    growth = rss[6000] - rss[3000]
    print(f"worker RSS: {rss[3000]:.0f} MiB after 3,000 embeds, {rss[6000]:.0f} MiB after 6,000")
    assert growth < 0.1 * rss[3000], f"RSS grew {growth:.0f} MiB from {rss[3000]:.0f} MiB"
    worker.stop()
