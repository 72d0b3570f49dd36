"""``rerank``, ``ner`` and ``classify`` through a real worker, against the libraries'
own answers (CrossEncoder, the transformers pipelines) on the same weights."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from celery import Celery

from tests.conftest import call, queue_name

LONG_DOC = "Paris is the capital and most populous city of France. " * 120  # far past 512 tokens
DOCUMENTS = [
    "Berlin is the capital of Germany.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "Bananas are rich in potassium.",
    LONG_DOC,
    "Capital cities often host the national government.",
    "",
]
QUERY = "What is the capital of France?"
TEXTS = [
    "Angela Merkel visited Washington and met Joe Biden.",
    "  Extra   spaces  around   Zürich and São Paulo  ",
    "Unbelievably, the anticonstitutionnellement word splits into pieces.",
    "naïve café in Köln — 日本語 🚀 emoji",
    "short",
]


def q(alias: str) -> str:
    return queue_name(f"enc-{alias}")


@pytest.fixture(params=["packed", "padded"])
def route(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A model's queue on the encoder worker (its forward passes packed, the default on
    the CPU) or on the Celery-intake worker (``packed: false``): the oracle tests run on
    both forward passes."""
    if request.param == "packed":
        request.getfixturevalue("encoder_worker")
        return q
    request.getfixturevalue("celery_intake_worker")
    return lambda alias: queue_name(f"cel-{alias}")


@pytest.fixture(scope="session")
def cross_encoder(test_models: dict[str, str]) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(test_models["reranker"], device="cpu")


@pytest.fixture(scope="session")
def pipelines(test_models: dict[str, str]) -> dict[str, Any]:
    from transformers import pipeline

    return {
        "ner": pipeline("token-classification", model=test_models["ner"], aggregation_strategy="simple", device="cpu"),
        "sentiment": pipeline("text-classification", model=test_models["sentiment"], top_k=None, device="cpu"),
        "topics": pipeline("text-classification", model=test_models["topics"], top_k=None, device="cpu"),
    }


# -- rerank ------------------------------------------------------------------------------


def test_rerank_equals_cross_encoder(route: Callable[[str], str], producer: Celery, cross_encoder: Any) -> None:
    expected = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    result = call(producer, "rerank", route("reranker"), model="reranker", query=QUERY, documents=DOCUMENTS)
    assert result["model"] == "reranker"
    results = result["results"]
    assert len(results) == len(DOCUMENTS)
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    for r in results:
        assert abs(r["relevance_score"] - float(expected[r["index"]])) < 1e-4
        assert "document" not in r
    assert result["usage"]["prompt_tokens"] > 0


def test_rerank_top_n_and_documents(encoder_worker: Any, producer: Celery, cross_encoder: Any) -> None:
    expected = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    result = call(
        producer,
        "rerank",
        q("reranker"),
        model="reranker",
        query=QUERY,
        documents=DOCUMENTS,
        top_n=2,
        return_documents=True,
    )
    best = list(np.argsort(-expected, kind="stable"))[:2]
    assert [r["index"] for r in result["results"]] == best
    assert [r["document"] for r in result["results"]] == [DOCUMENTS[i] for i in best]
    many = call(producer, "rerank", q("reranker"), model="reranker", query=QUERY, documents=DOCUMENTS[:2], top_n=10)
    assert len(many["results"]) == 2


# -- ner ---------------------------------------------------------------------------------


def test_ner_equals_pipeline(route: Callable[[str], str], producer: Celery, pipelines: dict[str, Any]) -> None:
    result = call(producer, "ner", route("ner"), model="ner", input=TEXTS)
    assert len(result["entities"]) == len(TEXTS)
    total = 0
    for text, got in zip(TEXTS, result["entities"]):
        expected = pipelines["ner"](text)
        assert [(e["label"], e["start"], e["end"]) for e in got] == [
            (e["entity_group"], e["start"], e["end"]) for e in expected
        ], text
        for g, e in zip(got, expected):
            assert abs(g["score"] - float(e["score"])) < 1e-4
            assert g["text"] == text[g["start"] : g["end"]]
        total += len(got)
    assert total > 5  # the random head labels plenty of spans: the comparison is not vacuous
    labels = {e["label"] for ents in result["entities"] for e in ents}
    assert labels & {"PER", "LOC"} and "MISC" in labels


def test_ner_single_string(encoder_worker: Any, producer: Celery, pipelines: dict[str, Any]) -> None:
    result = call(producer, "ner", q("ner"), model="ner", input=TEXTS[0])
    expected = pipelines["ner"](TEXTS[0])
    assert [(e["label"], e["start"], e["end"]) for e in result["entities"][0]] == [
        (e["entity_group"], e["start"], e["end"]) for e in expected
    ]


# -- classify ----------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["sentiment", "topics"])
def test_classify_equals_pipeline(
    alias: str, route: Callable[[str], str], producer: Celery, pipelines: dict[str, Any]
) -> None:
    result = call(producer, "classify", route(alias), model=alias, input=TEXTS, top_k=None)
    for text, got in zip(TEXTS, result["results"]):
        expected = pipelines[alias]([text])[0]
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected):
            assert abs(g["score"] - e["score"]) < 1e-4
    if alias == "topics":  # sigmoid: independent probabilities, not summing to one
        assert abs(sum(g["score"] for g in result["results"][0]) - 1.0) > 1e-3
    else:
        assert abs(sum(g["score"] for g in result["results"][0]) - 1.0) < 1e-5


def test_classify_top_k(encoder_worker: Any, producer: Celery, pipelines: dict[str, Any]) -> None:
    one = call(producer, "classify", q("sentiment"), model="sentiment", input="I love it")
    assert len(one["results"]) == 1 and len(one["results"][0]) == 1
    assert one["results"][0][0]["label"] == pipelines["sentiment"](["I love it"])[0][0]["label"]
    two = call(producer, "classify", q("sentiment"), model="sentiment", input=["a", "b"], top_k=2)
    assert [len(r) for r in two["results"]] == [2, 2]


# -- batching keeps results exact --------------------------------------------------------


def _requests() -> list[tuple[str, str, dict[str, Any]]]:
    rng = np.random.default_rng(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = []
    for i in range(50):
        n = int(rng.integers(1, 120))
        text = " ".join(rng.choice(words, n)) + f" {i}"
        kind = ("embed", "rerank", "ner", "classify")[i % 4]
        if kind == "embed":
            out.append(("embed", "minilm", {"input": [text, text[: len(text) // 2]]}))
        elif kind == "rerank":
            out.append(("rerank", "reranker", {"query": text[:30], "documents": [text, text[::-1], "x"]}))
        elif kind == "ner":
            out.append(("ner", "ner", {"input": text}))
        else:
            out.append(("classify", "sentiment", {"input": [text], "top_k": None}))
    return out


def _numbers(kind: str, result: dict[str, Any]) -> list[float]:
    if kind == "embed":
        return [x for v in result["embeddings"] for x in v]
    if kind == "rerank":
        return [r["relevance_score"] for r in sorted(result["results"], key=lambda r: r["index"])]
    if kind == "ner":
        return [e["score"] for ents in result["entities"] for e in ents]
    return [c["score"] for r in result["results"] for c in sorted(r, key=lambda c: c["label"])]


def _model_stats(producer: Celery, worker: Any) -> dict[str, Any]:
    replies = producer.control.broadcast("model_stats", reply=True, timeout=5, destination=[worker.name])
    assert replies, "the worker answers model_stats"
    return replies[0][worker.name]["models"]


def test_concurrent_mixed_requests_equal_each_request_alone(encoder_worker: Any, producer: Celery) -> None:
    check_mixed_requests_equal_alone(encoder_worker, producer, q)


def check_mixed_requests_equal_alone(worker: Any, producer: Celery, q: Callable[[str], str]) -> None:
    """50 concurrent requests of mixed tasks and lengths give each request's numbers alone."""
    requests = _requests()
    alone = [call(producer, kind, q(alias), model=alias, **kw) for kind, alias, kw in requests]
    before = _model_stats(producer, worker)
    with ThreadPoolExecutor(max_workers=50) as pool:
        sent = list(
            pool.map(lambda r: producer.send_task(r[0], kwargs={"model": r[1], **r[2]}, queue=q(r[1])), requests)
        )
        together = list(pool.map(lambda s: s.get(timeout=120), sent))
    for (kind, _, _), a, b in zip(requests, alone, together):
        if kind == "ner":
            assert [(e["label"], e["start"], e["end"]) for ents in a["entities"] for e in ents] == [
                (e["label"], e["start"], e["end"]) for ents in b["entities"] for e in ents
            ]
        if kind == "rerank":
            assert [r["index"] for r in a["results"]] == [r["index"] for r in b["results"]]
        # float32 sums taken in another order (other batch sizes and padded widths pick other
        # GEMM blockings) move a score by up to ~1e-5 on some CPUs (seen: 1.03e-5 for an NER
        # score on an AVX-512 host); the oracle tolerance of the issue, 1e-4, bounds it
        np.testing.assert_allclose(_numbers(kind, a), _numbers(kind, b), atol=1e-4)
    # and they really were gathered into shared forward passes
    after = _model_stats(producer, worker)
    rows = sum(after[m]["rows"] - before[m]["rows"] for m in after)
    batches = sum(after[m]["batches"] - before[m]["batches"] for m in after)
    requests_seen = sum(after[m]["requests"] - before[m]["requests"] for m in after)
    assert requests_seen == len(requests)
    assert batches < requests_seen, (batches, requests_seen, rows)


# -- bad input ---------------------------------------------------------------------------

COMMON_BAD = [
    ("unknown alias", {"model": "nope"}, "model"),
    ("unknown argument", {"bogus": 1}, "bogus"),
    ("model not a string", {"model": 3}, "model"),
]
BAD = {
    "rerank": [
        ("missing query", {"query": None}, "query"),
        ("query not text", {"query": 5}, "query"),
        ("empty documents", {"documents": []}, "documents"),
        ("documents not a list", {"documents": 5}, "documents"),
        ("documents not strings", {"documents": ["a", 2]}, "documents"),
        ("too many documents", {"documents": ["a"] * 2049}, "documents"),
        ("top_n zero", {"top_n": 0}, "top_n"),
        ("top_n negative", {"top_n": -2}, "top_n"),
        ("top_n not int", {"top_n": "3"}, "top_n"),
        ("return_documents not bool", {"return_documents": "yes"}, "return_documents"),
        ("wrong task model", {"model": "sentiment"}, "model"),
    ],
    "ner": [
        ("empty input", {"input": []}, "input"),
        ("input not text", {"input": 1.5}, "input"),
        ("too many items", {"input": ["a"] * 2049}, "input"),
        ("wrong task model", {"model": "minilm"}, "model"),
    ],
    "classify": [
        ("empty input", {"input": []}, "input"),
        ("input not text", {"input": {"a": 1}}, "input"),
        ("too many items", {"input": ["a"] * 2049}, "input"),
        ("top_k zero", {"top_k": 0}, "top_k"),
        ("top_k not int", {"top_k": 1.5}, "top_k"),
        ("wrong task model", {"model": "reranker"}, "model"),
    ],
}
VALID = {
    "rerank": ("reranker", {"query": "q", "documents": ["a", "b"]}),
    "ner": ("ner", {"input": "Angela lives in Berlin"}),
    "classify": ("sentiment", {"input": "good"}),
}
MATRIX = [(task, *case) for task, cases in BAD.items() for case in COMMON_BAD + cases]


@pytest.mark.parametrize("task,label,change,field", MATRIX, ids=[f"{m[0]}-{m[1]}" for m in MATRIX])
def test_bad_input(
    task: str, label: str, change: dict[str, Any], field: str, encoder_worker: Any, producer: Celery
) -> None:
    alias, kwargs = VALID[task]
    kwargs = {"model": alias, **kwargs, **change}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    result = producer.send_task(task, kwargs=kwargs, queue=q(alias))
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest", repr(info.value)
    assert field in str(info.value)


def test_every_model_runs_packed_on_the_cpu_unless_asked_not_to(encoder_worker: Any, celery_intake_worker: Any) -> None:
    """The oracle tests above cover both forward passes: every encoder model here is a
    BERT model, packed by default on the CPU (checked at load), and padded where
    ``packed: false``."""

    def packed(worker: Any) -> dict[str, bool]:
        return {e["model"]: e["packed"] for e in worker.events() if e.get("event") == "model.ready"}

    aliases = {"minilm", "reranker", "ner", "sentiment", "topics"}
    assert packed(encoder_worker) == dict.fromkeys(aliases, True)
    assert packed(celery_intake_worker) == dict.fromkeys(aliases, False)
    checks = {e["model"]: e for e in encoder_worker.events() if e.get("event") == "encoder.packed"}
    assert set(checks) == aliases
    for check in checks.values():
        assert check["gemm"] in ("torch", "onednn") and check["max_difference"] < 1e-4


def test_an_encoder_only_worker_sets_openmps_spin_before_torch_loads(encoder_worker: Any, gen_worker: Any) -> None:
    (openmp,) = [e for e in encoder_worker.events() if e.get("event") == "worker.openmp"]
    assert openmp["gomp_spincount"] == "10000" and openmp["applied"] is True
    assert not [e for e in gen_worker.events() if e.get("event") == "worker.openmp"]


def test_still_serving_after_bad_input(encoder_worker: Any, producer: Celery) -> None:
    for task, (alias, kwargs) in VALID.items():
        result = call(producer, task, q(alias), model=alias, **kwargs)
        assert result["model"] == alias
    assert encoder_worker.alive()
