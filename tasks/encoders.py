"""``embed``, ``rerank``, ``ner`` and ``classify`` (CONTRACT §3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import shared_task

from models.base import CLASSIFY, EMBED, NER, RERANK
from models.registry import registry
from tasks.base import InferenceTask, drop_if_answered, serve
from tasks.schemas import ClassifyRequest, EmbedRequest, NerRequest, Request, RerankRequest

if TYPE_CHECKING:  # torch and transformers load with the models, not with the task modules
    from models.base import Encoder
    from models.encoder import Prepared


@shared_task(name="embed", base=InferenceTask, bind=True)
def embed(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _serve(self, "embed", args, kwargs)


@shared_task(name="rerank", base=InferenceTask, bind=True)
def rerank(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _serve(self, "rerank", args, kwargs)


@shared_task(name="ner", base=InferenceTask, bind=True)
def ner(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _serve(self, "ner", args, kwargs)


@shared_task(name="classify", base=InferenceTask, bind=True)
def classify(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _serve(self, "classify", args, kwargs)


def _serve(task: InferenceTask, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    drop_if_answered(task)
    schema, planner = PLANNERS[kind]
    return serve(task, kind, schema, args, kwargs, lambda req: execute(planner(req)))


@dataclass
class Plan:
    """A validated request bound to its runtime: how to prepare it (tokenize), and how to
    build the task's result from the runtime's output and the token count."""

    runtime: Encoder
    prepare: Callable[[], Prepared]
    build: Callable[[Any, int], dict[str, Any]]


def execute(plan: Plan) -> dict[str, Any]:
    """One request on its own: prepare, run through the batcher, build the result."""
    output, tokens = plan.runtime.serve(plan.prepare)
    return plan.build(output, tokens)


def plan_embed(req: EmbedRequest) -> Plan:
    runtime = registry.encoder(req.model, EMBED)

    def build(vectors: list[list[float]], tokens: int) -> dict[str, Any]:
        return {
            "model": req.model,
            "embeddings": vectors,
            "dimensions": len(vectors[0]),
            "usage": {"prompt_tokens": tokens},
        }

    return Plan(runtime, lambda: runtime.prepare_embed(req.input, normalize=req.normalize), build)


def plan_rerank(req: RerankRequest) -> Plan:
    runtime = registry.encoder(req.model, RERANK)

    def build(scores: list[float], tokens: int) -> dict[str, Any]:
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if req.top_n is not None:
            order = order[: req.top_n]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                item["document"] = req.documents[i]
            results.append(item)
        return {"model": req.model, "results": results, "usage": {"prompt_tokens": tokens}}

    return Plan(runtime, lambda: runtime.prepare_rerank(req.query, req.documents), build)


def plan_ner(req: NerRequest) -> Plan:
    runtime = registry.encoder(req.model, NER)

    def build(entities: list[list[dict[str, Any]]], tokens: int) -> dict[str, Any]:
        return {"model": req.model, "entities": entities, "usage": {"prompt_tokens": tokens}}

    return Plan(runtime, lambda: runtime.prepare_ner(req.input), build)


def plan_classify(req: ClassifyRequest) -> Plan:
    runtime = registry.encoder(req.model, CLASSIFY)

    def build(ranked: list[list[tuple[str, float]]], tokens: int) -> dict[str, Any]:
        k = req.top_k
        results = [[{"label": label, "score": score} for label, score in labels[:k]] for labels in ranked]
        return {"model": req.model, "results": results, "usage": {"prompt_tokens": tokens}}

    return Plan(runtime, lambda: runtime.prepare_classify(req.input), build)


PLANNERS: dict[str, tuple[type[Request], Callable[[Any], Plan]]] = {
    EMBED: (EmbedRequest, plan_embed),
    RERANK: (RerankRequest, plan_rerank),
    NER: (NerRequest, plan_ner),
    CLASSIFY: (ClassifyRequest, plan_classify),
}
"""Each encoder task's request schema and planner: for its Celery task, and for the bulk
intake (worker/intake/)."""
