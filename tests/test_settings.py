"""The worker's settings and model registry (worker/settings.py): defaults, the environment
over the file, errors that name the field, and which queues the bulk intake takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> Any:
    from worker.settings import load_settings

    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WORKER_CONFIG", str(path))
    return load_settings()


def test_defaults_serve_the_bundled_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    monkeypatch.delenv("WORKER_CONFIG", raising=False)
    settings = load_settings()
    assert set(settings.hosted) == {"minilm", "gemma"}
    assert settings.queue_of("minilm") == "minilm"
    assert settings.models["gemma"].backend == "llama_cpp"
    assert settings.visibility_timeout > max(settings.time_limits.values())


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("WORKER_SERVE", '["b"]')
    settings = _settings(
        tmp_path,
        monkeypatch,
        {
            "concurrency": 5,
            "models": {"a": {"task": "embed", "source": "x"}, "b": {"task": "ner", "source": "y", "queue": "q"}},
        },
    )
    assert settings.concurrency == 3
    assert list(settings.hosted) == ["b"] and settings.queue_of("b") == "q"


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"models": {"m": {"task": "summarize", "source": "x"}}}, "models.m.task"),
        ({"models": {"m": {"task": "embed"}}}, "models.m.source"),
        ({"models": {"m": {"task": "embed", "source": "x", "max_lenght": 5}}}, "models.m.max_lenght"),
        ({"models": {"m": {"task": "embed", "source": "x.gguf"}}}, "llama_cpp serves only task 'generate'"),
        ({"models": {"m": {"task": "embed", "source": "x", "n_ctx": 512}}}, "n_ctx: not an option of the transformers"),
        ({"models": {"m": {"task": "generate", "source": "x.gguf", "packed": False}}}, "packed: not an option"),
        ({"models": {}}, "registry is empty"),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "serve": ["n"]}, "serve"),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "device": "tpu"}, "device"),
        (
            {
                "models": {"m": {"task": "embed", "source": "x"}},
                "time_limits": {"generate": 100},
                "visibility_timeout": 50,
            },
            "visibility_timeout",
        ),
        ({"models": {"m": {"task": "embed", "source": "x"}}, "concurrency": 0}, "concurrency"),
        ({"modles": {}}, "modles"),
    ],
)
def test_bad_registry_names_the_problem(
    config: dict[str, Any], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.settings import ConfigError

    with pytest.raises(ConfigError, match="invalid worker configuration") as info:
        _settings(tmp_path, monkeypatch, config)
    assert needle in str(info.value)


def test_a_bad_registry_stops_the_worker_at_boot(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"m": {"task": "embed", "source": "x", "batching": {"max_batch_size": 0}}}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin", "WORKER_CONFIG": str(path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "models.m.batching.max_batch_size" in proc.stderr


def test_a_model_that_fails_to_load_stops_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"m": {"task": "embed", "source": str(tmp_path / "nowhere")}}, "device": "cpu"})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin", "WORKER_CONFIG": str(path), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr


def test_bulk_intake_takes_only_encoder_only_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = {
        "e": {"task": "embed", "source": "x"},
        "r": {"task": "rerank", "source": "x", "queue": "shared"},
        "g": {"task": "generate", "source": "x.gguf", "queue": "shared"},
        "n": {"task": "ner", "source": "x", "queue": "enc"},
        "c": {"task": "classify", "source": "x", "queue": "enc"},
    }
    assert sorted(_settings(tmp_path, monkeypatch, {"models": models}).bulk_queues()) == ["e", "enc"]
    assert _settings(tmp_path, monkeypatch, {"models": models, "intake": "celery"}).bulk_queues() == []
    assert _settings(tmp_path, monkeypatch, {"models": models, "pool": "prefork"}).bulk_queues() == []


def test_the_configuration_reference_is_current() -> None:
    """docs/configuration.md is made from the settings (python -m worker.reference)."""
    from worker.reference import markdown

    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert path.read_text() == markdown(), "run: python -m worker.reference > docs/configuration.md"
