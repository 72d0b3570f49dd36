"""A real worker process for the tests and the benchmarks alike: ``celery -A worker worker``
in a subprocess with its own YAML registry, JSON logs, a bounded wait for its
``worker.ready`` line, a warm stop (SIGTERM, then SIGKILL) and a cold one (SIGKILL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 240.0


class WorkerProcess:
    """``name`` is the node name (``name@localhost``) and names its files in ``workdir``."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = f"{name}@localhost"
        self.config = config
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = {
            # the worker's settings are its YAML file's: none leak in from this environment
            **{k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
            "WORKER_CONFIG": str(self.config_path),
            "WORKER_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_event: dict[str, Any] | None = None
        self._run_offset = 0  # where the current run's lines start in the log
        self._read_offset = 0
        self._events: list[dict[str, Any]] = []
        self._run_first_event = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = BOOT_TIMEOUT, wait: bool = True) -> WorkerProcess:
        """Start the worker (a restart appends to its log); with ``wait``, until it is ready."""
        self.ready_event = None
        self.events()  # what the last run wrote
        self._run_first_event = len(self._events)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", self.name, "--without-gossip"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self.wait_ready(timeout) if wait else self

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> WorkerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.find_event("worker.ready")
            if event:
                self.ready_event = event
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"worker {self.name} not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def events(self, this_run: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines of every run of this worker, or of the current run only (read
        incrementally: a long benchmark's log is not parsed again on every look)."""
        if self.log_path.exists():
            with self.log_path.open("rb") as f:
                f.seek(self._read_offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # whole lines only
            self._read_offset += end
            for line in data[:end].decode(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        self._events.append(json.loads(line))
        return self._events[self._run_first_event :] if this_run else list(self._events)

    def find_event(self, name: str) -> dict[str, Any] | None:
        """The first ``name`` event of this worker's current run."""
        return next((e for e in self.events(this_run=True) if e.get("event") == name), None)

    def liveness_id(self) -> str:
        event = self.find_event("liveness.started")
        assert event is not None, f"worker {self.name} logged no liveness id:\n{self.log_tail()}"
        return event["id"]

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker process so far (``/proc/<pid>/stat``; Linux)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def minor_faults(self) -> int:
        """Minor page faults of the worker process so far (``/proc/<pid>/stat``; Linux)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing handed back."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """A warm shutdown (SIGTERM: it finishes what it holds), SIGKILL past ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
