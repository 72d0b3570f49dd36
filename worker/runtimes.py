"""Registry entries (settings) to runtime objects (models/)."""

from __future__ import annotations

from models.base import Runtime
from models.batcher import BatchLimits
from models.options import CausalLMOptions, GGUFOptions
from models.sources import resolve_source
from worker.settings import ModelSpec, WorkerSettings


def build_runtime(alias: str, spec: ModelSpec, settings: WorkerSettings, device: str) -> Runtime:
    source = resolve_source(spec.source)
    options = spec.options()
    if isinstance(options, GGUFOptions):
        from models.gguf import GGUFRuntime

        return GGUFRuntime(alias, source, device, options)
    if isinstance(options, CausalLMOptions):
        from models.causal_lm import CausalLMRuntime

        return CausalLMRuntime(alias, source, device, options)
    from models.encoder import EncoderRuntime

    return EncoderRuntime(
        alias,
        spec.task,
        source,
        device,
        options,
        BatchLimits(**settings.batching_for(alias).model_dump()),
        request_timeout=settings.time_limits[spec.task],
    )
