"""``embed``, ``rerank``, ``ner`` and ``classify`` (CONTRACT §3)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from models.base import CLASSIFY, EMBED, NER, RERANK
from models.registry import registry
from tasks.base import InferenceTask, serve
from tasks.schemas import ClassifyRequest, EmbedRequest, NerRequest, RerankRequest


@shared_task(name="embed", base=InferenceTask, bind=True)
def embed(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return serve(self, "embed", EmbedRequest, args, kwargs, _embed)


@shared_task(name="rerank", base=InferenceTask, bind=True)
def rerank(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return serve(self, "rerank", RerankRequest, args, kwargs, _rerank)


@shared_task(name="ner", base=InferenceTask, bind=True)
def ner(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return serve(self, "ner", NerRequest, args, kwargs, _ner)


@shared_task(name="classify", base=InferenceTask, bind=True)
def classify(self: InferenceTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return serve(self, "classify", ClassifyRequest, args, kwargs, _classify)


def _embed(req: EmbedRequest) -> dict[str, Any]:
    runtime = registry.get(req.model, EMBED)
    vectors, tokens = runtime.embed(req.input, normalize=req.normalize)
    return {
        "model": req.model,
        "embeddings": vectors,
        "dimensions": len(vectors[0]),
        "usage": {"prompt_tokens": tokens},
    }


def _rerank(req: RerankRequest) -> dict[str, Any]:
    runtime = registry.get(req.model, RERANK)
    scores, tokens = runtime.rerank(req.query, req.documents)
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


def _ner(req: NerRequest) -> dict[str, Any]:
    runtime = registry.get(req.model, NER)
    entities, tokens = runtime.ner(req.input)
    return {"model": req.model, "entities": entities, "usage": {"prompt_tokens": tokens}}


def _classify(req: ClassifyRequest) -> dict[str, Any]:
    runtime = registry.get(req.model, CLASSIFY)
    ranked, tokens = runtime.classify(req.input)
    k = req.top_k
    results = [[{"label": label, "score": score} for label, score in labels[:k]] for labels in ranked]
    return {"model": req.model, "results": results, "usage": {"prompt_tokens": tokens}}
