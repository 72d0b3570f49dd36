"""Keep the memory a forward pass frees for the next one, under glibc's malloc.

A forward pass on the CPU allocates its activations afresh in every layer, megabytes at a
time, and frees them again. glibc gives large blocks back to the kernel as they are freed:
a block above the mmap threshold (128 KiB at first, rising to at most 32 MiB as blocks
are freed) is mapped and unmapped each time, a thread's arena (the compute thread runs
the forward passes, so its allocations live in one) drops each heap that empties, and
the main heap trims its top. The next pass then takes the same memory from the kernel
again, page by page, zeroed, one page fault each. Measured on the test reranker (a
MiniLM-L6 cross-encoder) with 64 passages of 107-289 tokens, 30 requests one at a time
through a worker on a 2-core AMD EPYC, in turns: 190,000-214,000 page faults per request
and a median of 2,106-2,142 ms without the settings below; 100-600 faults and
1,698-1,814 ms with them (17-21% less time).

So before the models load, the worker tells glibc (``mallopt``):

* one arena (``M_ARENA_MAX``): every thread allocates from the main heap, which never
  drops a heap. The threads hold Python's GIL for most of what they allocate, and the
  forward passes run on one compute thread, so they rarely contend for it.
* no mapped blocks (``M_MMAP_MAX`` 0): every block comes from the heap, and a freed one
  is reused. The feed-forward activation of a batch of 10,000 tokens is 61 MiB, above
  any mmap threshold glibc accepts.
* a trim threshold of 1 GiB (``M_TRIM_THRESHOLD``): the top of the heap goes back to the
  kernel only once that much of it is free.

Once the models are loaded, ``malloc_trim`` gives back the free pages inside the heap that
loading left (29 MiB for that reranker). The price is resident memory: the process keeps
what its largest forward passes needed, bounded by the batch limits, instead of returning
it between passes (921-978 MiB against 776-829 MiB in the runs above).
``retain_memory: false`` turns this off. An operator's own malloc settings win: with
``GLIBC_TUNABLES`` naming a ``glibc.malloc`` tunable, one of ``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` set, or
another allocator preloaded (``LD_PRELOAD``), nothing is changed. Other C libraries
(musl, macOS) are left alone.

Kept memory is not all reused: with one arena and no mapped blocks, the long-lived small
objects of a busy worker (results, messages, tokenizer output) settle between the large
blocks of its forward passes, and varied batch sizes then need fresh heap. Under steady
one-sentence embed traffic RSS kept rising (by ~35 MiB per 1,000 tasks from 1.0 GiB, and
by gigabytes with more varied traffic), where without these settings it levelled off. So
the setting is off by default (GPU hosts do not need it), and where it is on, a watch
thread hands the kept memory back (``malloc_trim``) whenever RSS has grown
``retain_memory_slack_mib`` above its level after the last hand-back: the process keeps
what its forward passes need, and cannot grow for ever.

``mallopt(M_ARENA_MAX)`` binds only threads that have not yet taken an arena, so it runs
before the models load, while the process has one thread (``tests/test_memory.py`` checks
that it takes effect this way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Mapping

import structlog

log = structlog.get_logger("worker")

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_THRESHOLD = 1024 * 1024 * 1024

_OPERATOR_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def operator_setting(environ: Mapping[str, str]) -> str | None:
    """The environment variable through which an operator already set up malloc, if any."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    for name in _OPERATOR_VARIABLES:
        if name in environ:
            return name
    if "malloc" in environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return "LD_PRELOAD"
    return None


def retain_freed_memory(environ: Mapping[str, str]) -> dict[str, object]:
    """Apply the settings above to this process where they apply; returns what was done,
    for the ``worker.memory`` log line."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"applied": False, "reason": "not glibc"}
    if (name := operator_setting(environ)) is not None:
        return {"applied": False, "reason": f"{name} is set"}
    libc = _libc()
    settings = {
        "arena_max": (M_ARENA_MAX, 1),
        "mmap_max": (M_MMAP_MAX, 0),
        "trim_threshold": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    }
    refused = [key for key, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    done: dict[str, object] = {key: value for key, (_, value) in settings.items() if key not in refused}
    done["applied"] = not refused
    if refused:
        done["refused"] = refused
    return done


def apply(enabled: bool, environ: Mapping[str, str]) -> bool:
    """The worker's call, before its models load: apply and log; whether it applied."""
    if not enabled:
        log.info("worker.memory", applied=False, reason="retain_memory: false")
        return False
    done = retain_freed_memory(environ)
    log.info("worker.memory", **done)
    return bool(done["applied"])


def release_free_pages() -> int:
    """Give the kernel back the free pages inside the heap (glibc's ``malloc_trim``), once
    the models are loaded: what loading freed (copies of the weights, the checkpoint's
    buffers) would otherwise stay resident. Returns the resident bytes released, as far as
    the process's RSS tells."""
    before = _rss()
    _libc().malloc_trim(0)
    return max(0, before - _rss())


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TrimWatch:
    """Hands kept memory back whenever RSS has grown ``slack`` bytes above its level after
    the last hand-back (checked every ``every_s`` seconds, on a thread of its own)."""

    def __init__(self, slack: int, every_s: float = 2.0) -> None:
        self.slack = slack
        self.every_s = every_s
        self.floor = _rss()
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-trim", daemon=True)

    def start(self) -> TrimWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        rss = _rss()
        if rss <= self.floor + self.slack:
            return False
        _libc().malloc_trim(0)
        self.floor = _rss()
        self.trims += 1
        log.info("worker.memory_trimmed", before_mib=round(rss / 2**20, 1), after_mib=round(self.floor / 2**20, 1))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()
