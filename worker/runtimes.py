"""Registry entries (settings) to runtime objects (models/)."""

from __future__ import annotations

from models.base import Runtime
from models.batcher import BatchLimits
from models.sources import resolve_source
from worker.settings import ModelSpec, WorkerSettings


def build_runtime(alias: str, spec: ModelSpec, settings: WorkerSettings, device: str) -> Runtime:
    source = resolve_source(spec.source)
    time_limit = settings.time_limits[spec.task]
    if spec.backend == "llama_cpp":
        from models.gguf import GGUFOptions, GGUFRuntime

        return GGUFRuntime(
            alias,
            GGUFOptions(
                path=source,
                device=device,
                n_ctx=spec.n_ctx,
                n_batch=spec.n_batch,
                n_threads=spec.n_threads,
                n_gpu_layers=spec.n_gpu_layers,
                chat_format=spec.chat_format,
                weight_repacking=spec.weight_repacking,
            ),
        )
    if spec.task == "generate":
        from models.causal_lm import CausalLMOptions, CausalLMRuntime

        return CausalLMRuntime(
            alias,
            CausalLMOptions(
                source=source,
                device=device,
                dtype=spec.dtype,
                max_length=spec.max_length,
                trust_remote_code=spec.trust_remote_code,
                revision=spec.revision,
                gguf_file=spec.gguf_file,
            ),
        )
    from models.encoder import EncoderOptions, EncoderRuntime

    batching = settings.batching_for(alias)
    return EncoderRuntime(
        alias,
        EncoderOptions(
            task=spec.task,
            source=source,
            device=device,
            dtype=spec.dtype,
            max_length=spec.max_length,
            trust_remote_code=spec.trust_remote_code,
            revision=spec.revision,
            request_timeout=time_limit,
            packed=spec.packed,
            packed_gemm=spec.packed_gemm,
            packed_attention=spec.packed_attention,
        ),
        BatchLimits(**batching.model_dump()),
    )
