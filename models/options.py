"""Each runtime's per-model options, declared once: one pydantic model per runtime, each
field with its description and bounds. The worker's model registry composes them
(worker/settings.py ``ModelSpec``), so an option is written in a model's registry entry
and validated at boot. No torch here: the settings validate before anything loads.

Adding an option: a field here, its use in the runtime, and its test.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TransformersOptions(_Options):
    """What every transformers runtime takes."""

    trust_remote_code: bool = Field(True, description="Allow custom model code from the source.")
    revision: str | None = Field(None, description="Hub revision to load.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto is float16 on CUDA and float32 elsewhere."
    )
    max_length: int | None = Field(None, ge=1, description="Token limit; default from the model.")


class EncoderOptions(TransformersOptions):
    """models/encoder.py: embed, rerank, ner and classify."""

    packed: bool = Field(
        True,
        description="On the CPU: run a BERT-family encoder model without padding (checked against its own forward "
        "pass at load; other models are unaffected).",
    )
    packed_gemm: Literal["auto", "torch", "onednn"] = Field(
        "auto",
        description="The packed forward pass's GEMM library: torch (nn.Linear's, MKL on x86) or oneDNN; auto times "
        "both at load and keeps the faster.",
    )
    packed_attention: Literal["auto", "torch"] = Field(
        "auto",
        description="The packed forward pass's attention for rows of up to 64 tokens in float32: auto takes the C "
        "kernel built at install where the CPU has AVX-512, torch always torch's operations.",
    )


class GenerationOptions(_Options):
    """What every generate runtime takes: continuous batching (models/continuous.py)."""

    parallel: int = Field(
        1,
        ge=1,
        le=256,
        description="Generations decoded together, each in its own slot (llama.cpp: the context is split between "
        "the slots). 1 decodes one at a time, with text exactly as the library gives it alone; above 1, a batch's "
        "arithmetic can change a greedy text (docs/generation.md says how often).",
    )
    max_waiting: int = Field(
        16,
        ge=0,
        le=4096,
        description="With parallel > 1: requests that may wait for a slot; past that a request is refused with "
        "Overloaded and retried later.",
    )


class CausalLMOptions(TransformersOptions, GenerationOptions):
    """models/causal_lm.py: generate on a transformers causal LM."""

    gguf_file: str | None = Field(
        None, description="A .gguf file inside source to load (dequantised) with from_pretrained."
    )


class GGUFOptions(GenerationOptions):
    """models/gguf.py: generate on a GGUF model through llama-cpp-python."""

    n_ctx: int = Field(4096, ge=16, description="Context window in tokens (split between the slots with parallel > 1).")
    n_batch: int = Field(512, ge=1, description="Prompt-processing batch size.")
    n_threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores.")
    n_gpu_layers: int | None = Field(None, ge=-1, description="Layers on the GPU; default -1 on a GPU, 0 on the CPU.")
    chat_format: str | None = Field(
        None, description="Chat format name (llama-cpp's); default: the template in the GGUF metadata."
    )
    weight_repacking: bool | None = Field(
        None,
        description="Let llama.cpp repack weights for this CPU (AMX, AVX layouts); default: on, except with a build "
        "that uses AMX, whose kernels crash (llama.cpp #20824).",
    )


RuntimeOptions = EncoderOptions | CausalLMOptions | GGUFOptions


def options_class(backend: str, task: str) -> type[RuntimeOptions]:
    """The options of the runtime that serves ``task`` on ``backend``."""
    if backend == "llama_cpp":
        return GGUFOptions
    return CausalLMOptions if task == "generate" else EncoderOptions


ALL_OPTIONS: tuple[type[_Options], ...] = (EncoderOptions, CausalLMOptions, GGUFOptions)
