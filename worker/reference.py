"""The configuration reference (docs/configuration.md), made from the settings' own
fields: ``python -m worker.reference > docs/configuration.md``. A test keeps it current."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from models.options import CausalLMOptions, EncoderOptions, GGUFOptions
from worker.settings import BatchingSettings, ModelSpec, WorkerSettings


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, dict):
            return (
                "`{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: …" for k, v in value.items()) + "}`"
            )
        return f"`{value}`"
    if field.is_required():
        return "required"
    return f"`{field.default}`"


def _table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    rows = ["| setting | default | what it does |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_default(field)} | {text} |")
    return "\n".join(rows)


def markdown() -> str:
    spec_own = [
        n
        for n in ModelSpec.model_fields
        if n not in EncoderOptions.model_fields | CausalLMOptions.model_fields | GGUFOptions.model_fields
    ]
    return (
        "\n\n".join(
            [
                "# Configuration reference",
                "Made from `worker/settings.py` and `models/options.py` by `python -m worker.reference`.\n"
                "Settings come from `WORKER_*` environment variables (nested keys joined with `__`, lists\n"
                "and mappings as JSON) and from the YAML file named by `WORKER_CONFIG`; the environment\n"
                "wins. Everything is validated when the worker starts.",
                "## The worker",
                _table(WorkerSettings, skip=("models", "batching")),
                "## `batching` (and a model's `batching`)",
                _table(BatchingSettings),
                "## A model's registry entry (`models.<alias>`)",
                _table(ModelSpec, skip=tuple(n for n in ModelSpec.model_fields if n not in spec_own)),
                "### Options of the transformers encoder runtime (embed, rerank, ner, classify)",
                _table(EncoderOptions),
                "### Options of the transformers causal-LM runtime (generate)",
                _table(CausalLMOptions),
                "### Options of the llama.cpp runtime (generate, a .gguf source)",
                _table(GGUFOptions),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    print(markdown(), end="")
