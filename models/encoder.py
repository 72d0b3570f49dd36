"""Encoder runtime: embeddings, cross-encoder reranking, classification and NER.

One class serves every encoder task; the registry's ``task`` picks the AutoModel class
and the single capability it declares. Requests tokenize in their own thread and share
forward passes through the model's :class:`~models.batcher.DynamicBatcher`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from models.base import CLASSIFY, EMBED, NER, RERANK
from models.batcher import BatchLimits, DynamicBatcher, Features
from models.compute import ComputeThread, shared_compute_thread
from models.device import flash_attention_available, resolve_dtype
from models.ner import aggregate_simple
from models.options import EncoderOptions
from models.packed import PackedBert, unpack
from models.packed.fit import fit_packed
from models.pooling import PoolingConfig, pool, read_pooling_config

log = structlog.get_logger(__name__)

_MODEL_CLASSES = {
    EMBED: AutoModel,
    RERANK: AutoModelForSequenceClassification,
    CLASSIFY: AutoModelForSequenceClassification,
    NER: AutoModelForTokenClassification,
}
_UNBOUNDED = 1_000_000  # tokenizers without a limit report ~1e30 as model_max_length


@dataclass
class Prepared:
    """A tokenized request: the rows for the batcher, and what turns their outputs into
    the task's answer."""

    items: list[Features]
    finish: Callable[[list[np.ndarray]], Any]

    @property
    def tokens(self) -> int:
        return sum(len(it["input_ids"]) for it in self.items)


class EncoderRuntime:
    def __init__(
        self,
        alias: str,
        task: str,
        source: str,
        device: str,
        options: EncoderOptions,
        limits: BatchLimits,
        *,
        request_timeout: float = 60.0,
    ) -> None:
        if task not in _MODEL_CLASSES:
            raise ValueError(f"task: the encoder runtime does not serve {task!r}")
        self.alias = alias
        self.task = task
        self.source = source
        self.options = options
        self.request_timeout = request_timeout
        self.capabilities = frozenset({task})
        self.device = device
        self._limits = limits
        self.batcher: DynamicBatcher | None = None
        self.compute: ComputeThread | None = None
        self.pooling: PoolingConfig | None = None
        self.packed: PackedBert | None = None
        self.max_length = 512

    # -- lifecycle ----------------------------------------------------------------------

    def load(self) -> None:
        # loading and every forward pass on the compute thread the worker's encoder models
        # share (models/compute.py); requests tokenize in their own threads, and the
        # batcher gathers them on its own
        self.compute = shared_compute_thread(f"encoders-{self.device}")
        self.compute.run(self._load)
        self.batcher = DynamicBatcher(self.alias, self._forward_on_compute_thread, self._limits)

    def _forward_on_compute_thread(self, items: Sequence[Features]) -> list[np.ndarray]:
        assert self.compute is not None
        return self.compute.run(self._forward, items)

    def _load(self) -> None:
        opts = self.options
        common: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code, "revision": opts.revision}
        # config first: it tells the max length and the labels before any weights load
        config = AutoConfig.from_pretrained(self.source, **common)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, use_fast=True, **common)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"source: {self.source} has no fast tokenizer (offsets and batching need one)")
        if self.task == EMBED:
            self.pooling = read_pooling_config(self.source)
        self.max_length = self._detect_max_length(config)
        model_kwargs: dict[str, Any] = {"dtype": resolve_dtype(opts.dtype, self.device), **common}
        if flash_attention_available(self.device):
            model_kwargs["attn_implementation"] = "flash_attention_2"
        self.model = _MODEL_CLASSES[self.task].from_pretrained(self.source, config=config, **model_kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.id2label = {int(k): v for k, v in getattr(self.config, "id2label", {}).items()}
        if self.task == RERANK and self.config.num_labels != 1:
            raise ValueError(f"task: a rerank model needs one output logit, {self.source} has {self.config.num_labels}")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        if opts.packed and self.device == "cpu":
            self.packed = self._checked_packed_runner()

    def _checked_packed_runner(self) -> PackedBert | None:
        """The padding-free runner, if it applies to this model and gives its results, on
        the faster of the GEMM libraries that give them (models/packed/fit.py)."""
        texts = [
            "A",
            "The quick brown fox jumps over the lazy dog.",
            "Ünïcödé, emoji 🙂 and   spaces: still one sentence.",
        ]
        items = self._tokenize_pairs("which fox?", texts) if self.task == RERANK else self._tokenize(texts)
        return fit_packed(
            self.model,
            alias=self.alias,
            gemm=self.options.packed_gemm,
            attention=self.options.packed_attention,
            check=items,
            padded=self._collate(items),
            tuning_sample=self._tuning_sample,
        )

    def _tuning_sample(self) -> list[Features]:
        """32 inputs of 15-30 tokens (pairs for rerank), a typical batch to time GEMMs on."""
        words = "the quick brown fox jumps over a lazy dog while seven wise owls watch from the old oak".split()
        texts = [" ".join(words[(i * 5) % len(words) :] + words)[: 60 + 4 * (i % 16)] for i in range(32)]
        if self.task == RERANK:
            return self._tokenize_pairs("where do the owls sit", texts)
        return self._tokenize(texts)

    def warmup(self) -> None:
        sample = "The quick brown fox jumps over the lazy dog."
        if self.task == EMBED:
            self.embed([sample], normalize=True)
        elif self.task == RERANK:
            self.rerank("fox", [sample])
        elif self.task == CLASSIFY:
            self.classify([sample])
        else:
            self.ner([sample])

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats.as_dict() if self.batcher is not None else {}

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "max_length": self.max_length,
            "dtype": str(self.model.dtype),
            "packed": self.packed is not None,
        }

    def _detect_max_length(self, config: Any) -> int:
        if self.options.max_length:
            return self.options.max_length
        if self.pooling is not None and self.pooling.max_seq_length:
            return int(self.pooling.max_seq_length)  # what SentenceTransformer truncates to
        limits = [
            int(v)
            for v in (
                getattr(config, "max_position_embeddings", None),
                getattr(config, "max_seq_length", None),
                getattr(config, "n_positions", None),
                getattr(self.tokenizer, "model_max_length", None),
            )
            if v and 0 < int(v) < _UNBOUNDED
        ]
        # RoBERTa-style configs count the padding offset in max_position_embeddings; the
        # tokenizer's limit is the usable one, hence the minimum
        return min(limits) if limits else 512

    # -- capabilities -------------------------------------------------------------------

    # Results come back from the batcher as numpy rows: the request threads do their
    # small post-processing in numpy, never in torch, whose thread pools are the batcher's.

    # Each task is prepared (tokenized, in the caller's thread), run through the batcher,
    # and finished (pooling outputs, probabilities, entities) from its rows. A Celery task
    # does the three in a row (``serve``); the bulk consumer prepares many requests, submits
    # them together and finishes each as its rows come back.

    def prepare_embed(self, texts: Sequence[str], normalize: bool = True) -> Prepared:
        normalize = normalize or (self.pooling is not None and self.pooling.normalize)

        def finish(rows: list[np.ndarray]) -> list[list[float]]:
            vectors = np.stack(rows)
            if normalize:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)  # as F.normalize(p=2, eps=1e-12)
            return vectors.tolist()

        return Prepared(self._tokenize(texts), finish)

    def prepare_rerank(self, query: str, documents: Sequence[str]) -> Prepared:
        def finish(rows: list[np.ndarray]) -> list[float]:
            logits = np.stack(rows)[:, 0].astype(np.float64)
            return (1.0 / (1.0 + np.exp(-logits))).tolist()

        return Prepared(self._tokenize_pairs(query, documents), finish)

    def prepare_classify(self, texts: Sequence[str]) -> Prepared:
        """Finishes to every label with its probability, best first, for each text."""

        def finish(rows: list[np.ndarray]) -> list[list[tuple[str, float]]]:
            logits = np.stack(rows).astype(np.float64)
            multi_label = self.config.problem_type == "multi_label_classification" or self.config.num_labels == 1
            probs = 1.0 / (1.0 + np.exp(-logits)) if multi_label else _softmax(logits)
            results = []
            for row in probs.tolist():
                ranked = sorted(enumerate(row), key=lambda p: p[1], reverse=True)
                results.append([(self.id2label.get(i, f"LABEL_{i}"), score) for i, score in ranked])
            return results

        return Prepared(self._tokenize(texts), finish)

    def prepare_ner(self, texts: Sequence[str]) -> Prepared:
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=self.uses_token_types,
        )
        # offsets and the special-token mask stay here; only ids go to the model
        offsets = encoded.pop("offset_mapping")
        special = encoded.pop("special_tokens_mask")

        def finish(rows: list[np.ndarray]) -> list[list[dict[str, Any]]]:
            return [
                aggregate_simple(text, _softmax(logits), offs, spec, self.id2label)
                for text, logits, offs, spec in zip(texts, rows, offsets, special)
            ]

        return Prepared(_split_features(encoded), finish)

    on_request: Callable[[float, float, int], None] | None = None
    """Told of each request ``serve`` runs: tokenization and model seconds, and tokens (the
    worker's metrics, where on)."""

    def serve(self, prepare: Callable[[], Prepared]) -> tuple[Any, int]:
        """Prepare, run and finish one request; returns its output and its token count."""
        with self._session():
            started = time.perf_counter()
            prepared = prepare()
            tokenized = time.perf_counter()
            rows = self._run(prepared.items)
        if self.on_request is not None:
            self.on_request(tokenized - started, time.perf_counter() - tokenized, prepared.tokens)
        return prepared.finish(rows), prepared.tokens

    def embed(self, texts: Sequence[str], normalize: bool = True) -> tuple[list[list[float]], int]:
        return self.serve(lambda: self.prepare_embed(texts, normalize))

    def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]:
        return self.serve(lambda: self.prepare_rerank(query, documents))

    def classify(self, texts: Sequence[str]) -> tuple[list[list[tuple[str, float]]], int]:
        return self.serve(lambda: self.prepare_classify(texts))

    def ner(self, texts: Sequence[str]) -> tuple[list[list[dict[str, Any]]], int]:
        return self.serve(lambda: self.prepare_ner(texts))

    # -- plumbing -----------------------------------------------------------------------

    def _session(self):  # noqa: ANN202
        assert self.batcher is not None, "load() first"
        return self.batcher.session()

    def _run(self, items: list[Features]) -> list[np.ndarray]:
        assert self.batcher is not None
        return self.batcher.run(items, timeout=self.request_timeout)

    def _tokenize(self, texts: Sequence[str]) -> list[Features]:
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.uses_token_types,
        )
        return _split_features(encoded)

    def _tokenize_pairs(self, query: str, documents: Sequence[str]) -> list[Features]:
        queries = [query] * len(documents)
        kwargs = dict(
            max_length=self.max_length, return_attention_mask=False, return_token_type_ids=self.uses_token_types
        )
        try:
            # cut the document, never the query
            encoded = self.tokenizer(queries, list(documents), truncation="only_second", **kwargs)
        except Exception:
            # the query alone is longer than the limit: cut both, longest first
            encoded = self.tokenizer(queries, list(documents), truncation="longest_first", **kwargs)
        return _split_features(encoded)

    def _collate(self, items: Sequence[Features]) -> dict[str, torch.Tensor]:
        n, width = len(items), max(len(it["input_ids"]) for it in items)
        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64) if self.uses_token_types else None
        for row, item in enumerate(items):
            k = len(item["input_ids"])
            input_ids[row, :k] = item["input_ids"]
            mask[row, :k] = 1
            if types is not None and "token_type_ids" in item:
                types[row, :k] = item["token_type_ids"]
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def _forward(self, items: Sequence[Features]) -> list[np.ndarray]:
        task = self.task
        if self.packed is not None:
            if task != EMBED:
                return self.packed.outputs(items)
            assert self.pooling is not None
            hidden, mask = unpack(*self.packed.hidden_states(items))
            return list(pool(self.pooling, hidden, mask).float().numpy())
        batch = self._collate(items)
        output = self.model(**batch)
        if task == EMBED:
            assert self.pooling is not None
            pooled = pool(self.pooling, output[0], batch["attention_mask"])
            return list(pooled.float().cpu().numpy())
        logits = output.logits.float().cpu().numpy()
        if task == NER:
            return [logits[r, : len(item["input_ids"])] for r, item in enumerate(items)]
        return list(logits)


def _split_features(encoded: Any) -> list[Features]:
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
