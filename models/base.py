"""The runtime interface: what a loaded model can do, declared up front.

Tasks never check classes; they ask the registry for "a runtime that can rerank" and
call the method named after the capability: an :class:`Encoder` for embed, rerank, ner
and classify, a :class:`Generator` for generate. The worker's lifecycle calls the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch and numpy come with the runtimes, not with this interface
    from models.batcher import DynamicBatcher
    from models.encoder import Prepared
    from models.generation import GenerationControl, GenerationParams, GenerationResult

EMBED = "embed"
RERANK = "rerank"
NER = "ner"
CLASSIFY = "classify"
GENERATE = "generate"


@runtime_checkable
class Runtime(Protocol):
    """A loaded model. Implementations add one method per capability they declare."""

    alias: str
    capabilities: frozenset[str]

    def load(self) -> None:
        """Load weights onto the device. Called once, in the process that serves."""

    def warmup(self) -> None:
        """Run one real inference so the first request pays no lazy-init cost."""

    def close(self) -> None:
        """Release threads and memory."""

    def describe(self) -> dict[str, Any]:
        """Static facts for the start-up log (max length, dtype, context size)."""

    def stats(self) -> dict[str, Any]:
        """Counters since start, for ``celery inspect model_stats``."""


class Encoder(Runtime, Protocol):
    """embed, rerank, ner, classify: a request is tokenized (``prepare_*``), its rows run
    through the model's batcher with other requests', and its answer built from theirs."""

    batcher: DynamicBatcher | None

    def prepare_embed(self, texts: Sequence[str], normalize: bool = True) -> Prepared: ...
    def prepare_rerank(self, query: str, documents: Sequence[str]) -> Prepared: ...
    def prepare_ner(self, texts: Sequence[str]) -> Prepared: ...
    def prepare_classify(self, texts: Sequence[str]) -> Prepared: ...

    def serve(self, prepare: Callable[[], Prepared]) -> tuple[Any, int]:
        """One request on its own: prepare it, run it through the batcher, finish it; the
        output and its token count."""
        ...


class Generator(Runtime, Protocol):
    """generate: one request's generation, streamed through ``control``; with
    ``parallel`` > 1 decoded together with the model's other generations."""

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationResult: ...

    def generation_load(self) -> tuple[int, int]:
        """Generations decoding now, and waiting for their turn."""
        ...
