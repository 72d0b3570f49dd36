"""Loaded runtimes by alias, looked up by capability."""

from __future__ import annotations

import threading
from typing import cast

from models.base import GENERATE, Encoder, Generator, Runtime
from wire.errors import InvalidRequest


class RuntimeRegistry:
    def __init__(self) -> None:
        self._runtimes: dict[str, Runtime] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()

    def add(self, runtime: Runtime) -> None:
        with self._lock:
            if runtime.alias in self._runtimes:
                raise ValueError(f"model {runtime.alias!r} is already loaded")
            self._runtimes[runtime.alias] = runtime

    def mark_ready(self) -> None:
        self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def get(self, alias: str, capability: str) -> Runtime:
        runtime = self._runtimes.get(alias)
        if runtime is None:
            known = ", ".join(sorted(self._runtimes)) or "none"
            raise InvalidRequest(f"model: unknown model {alias!r} on this worker (it serves: {known})")
        if capability not in runtime.capabilities:
            raise InvalidRequest(
                f"model: {alias!r} does not do {capability!r} (it does: {', '.join(sorted(runtime.capabilities))})"
            )
        return runtime

    def encoder(self, alias: str, capability: str) -> Encoder:
        """The runtime that serves ``alias`` for an encoder task, or ``InvalidRequest``."""
        return cast(Encoder, self.get(alias, capability))

    def generator(self, alias: str) -> Generator:
        return cast(Generator, self.get(alias, GENERATE))

    def stats(self) -> dict[str, dict]:
        return {alias: runtime.stats() for alias, runtime in self._runtimes.items()}

    def items(self) -> list[tuple[str, Runtime]]:
        with self._lock:
            return list(self._runtimes.items())

    def aliases(self) -> list[str]:
        return sorted(self._runtimes)

    def close(self) -> None:
        with self._lock:
            runtimes, self._runtimes = list(self._runtimes.values()), {}
            self._ready.clear()
        for runtime in runtimes:
            runtime.close()


registry = RuntimeRegistry()
"""The process-wide registry: one set of loaded models per worker process."""
