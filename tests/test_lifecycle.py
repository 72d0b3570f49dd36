"""What a worker sets up for itself before its models load (worker/lifecycle.py): OpenMP's
spin and oneDNN's caches, each unless the operator set them."""

from __future__ import annotations

from typing import Any


def test_an_encoder_only_worker_shortens_openmps_spin_and_leaves_the_rest_alone() -> None:
    """libgomp's default spin kept both cores busy after each forward pass; an encoder-only
    worker shortens it, a worker that generates keeps it (llama.cpp needs it), and an
    operator's own setting always wins."""
    from worker.lifecycle import ENCODER_SPINCOUNT, openmp_spincount
    from worker.settings import WorkerSettings

    def settings(models: dict[str, Any]) -> WorkerSettings:
        return WorkerSettings(models=models, serve=list(models))

    encoders = {"e": {"task": "embed", "source": "x"}, "r": {"task": "rerank", "source": "y"}}
    mixed = {**encoders, "g": {"task": "generate", "source": "model.gguf"}}
    assert openmp_spincount(settings(encoders), {}) == ENCODER_SPINCOUNT
    assert openmp_spincount(settings(mixed), {}) is None
    assert openmp_spincount(settings({"g": {"task": "generate", "source": "lm"}}), {}) is None
    assert openmp_spincount(settings(encoders), {"GOMP_SPINCOUNT": "300000"}) is None
    assert openmp_spincount(settings(encoders), {"OMP_WAIT_POLICY": "ACTIVE"}) is None


def test_the_worker_bounds_onednns_primitive_caches_unless_the_operator_did() -> None:
    from worker.lifecycle import ONEDNN_CACHE_CAPACITY, onednn_cache_settings

    both = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_CACHE_CAPACITY, "LRU_CACHE_CAPACITY": ONEDNN_CACHE_CAPACITY}
    assert onednn_cache_settings({}) == both
    assert onednn_cache_settings({"LRU_CACHE_CAPACITY": "1024"}) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert onednn_cache_settings(dict(both, LRU_CACHE_CAPACITY="8")) == {}
