"""The padding-free forward pass of a BERT or RoBERTa model and its three heads (see the
package's docstring for why and where it applies)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.batcher import Features
from models.packed.batch import Batch, concat
from models.packed.gemm import LINEARS, Gemm, LayerWeights, available_linears, fuse_qkv
from models.packed.kernel import attention_kernel

# the heads this module reimplements, by class name (a subclass may change the forward
# pass): what each returns, and the attribute holding the encoder (None: the model is it)
_HEADS: dict[str, tuple[str, str | None]] = {}
for _family, _attr in (("Bert", "bert"), ("Roberta", "roberta"), ("XLMRoberta", "roberta")):
    _HEADS[f"{_family}Model"] = ("hidden", None)
    _HEADS[f"{_family}ForTokenClassification"] = ("tokens", _attr)
    _HEADS[f"{_family}ForSequenceClassification"] = ("first", _attr)
_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


class PackedBert:
    """Runs a BERT or RoBERTa model (one of ``_HEADS``) on token id sequences without
    padding them."""

    def __init__(self, model: Any, head: str, encoder: Any, linear: str = "torch", attention: str = "auto") -> None:
        self.model = model
        self.head = head
        self.embeddings = encoder.embeddings
        self.layers = list(encoder.encoder.layer)
        # RoBERTa counts positions from its padding id + 1, and gives a padding token
        # (one written in the text, say) the padding id's position, as its own forward does
        self.padding_idx = getattr(self.embeddings, "padding_idx", None)
        # a sequence classifier's head on the first token's state: BERT's pooler and
        # classifier, or RoBERTa's classification head (dense, tanh, projection)
        classifier = getattr(model, "classifier", None)
        if head != "first":
            self._first_head: tuple[Any, Any] | None = None
        elif hasattr(classifier, "out_proj"):
            self._first_head = (classifier.dense, classifier.out_proj)
        else:
            self._first_head = (encoder.pooler.dense, classifier)
        first_attention = self.layers[0].attention.self
        self.heads = first_attention.num_attention_heads
        self.head_size = first_attention.attention_head_size
        self.scaling = getattr(first_attention, "scaling", self.head_size**-0.5)
        self.qkv = [fuse_qkv(layer.attention.self) for layer in self.layers]
        # oneDNN fuses the feed-forward activation where it has it (exact or tanh GELU)
        self._gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(
            getattr(model.config, "hidden_act", None)  # type: ignore[arg-type]
        )
        self._weights: dict[str, list[LayerWeights]] = {}  # by GEMM library, made on first use
        self.use("torch" if linear == "auto" else linear)
        if attention not in ("auto", "torch"):
            raise ValueError(f"attention: auto or torch, not {attention!r}")
        # the C kernel for short rows (models/_packed_attention.c), where built and usable
        kernel = attention_kernel() if attention == "auto" else None
        self.kernel = kernel if kernel is not None and kernel.takes_head_size(self.head_size) else None

    @classmethod
    def for_model(cls, model: Any, linear: str = "torch", attention: str = "auto") -> PackedBert | None:
        """The packed runner for ``model`` (as the encoder runtime loads it), or None where
        it does not apply. ``linear``: a key of ``LINEARS`` (``auto`` is the runtime's:
        it calls ``tune``). ``attention``: ``auto`` runs short rows' attention on the C
        kernel where it is built and the CPU has AVX-512, ``torch`` always on torch's
        operations."""
        config = getattr(model, "config", None)
        head, attr = _HEADS.get(type(model).__name__, (None, None))
        if (
            head is None
            or config is None
            or getattr(config, "model_type", None) not in _MODEL_TYPES
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or getattr(config, "is_decoder", False)
            or getattr(config, "add_cross_attention", False)
            or getattr(config, "chunk_size_feed_forward", 0)
        ):
            return None
        encoder = model if attr is None else getattr(model, attr)
        if head == "first" and not hasattr(model.classifier, "out_proj") and getattr(encoder, "pooler", None) is None:
            return None
        return cls(model, head, encoder, linear, attention)

    def use(self, linear: str) -> None:
        """Run the matrix products on ``linear`` (a key of ``LINEARS``) from now on, and
        free the weights any other library had reordered."""
        self._select(linear)
        self._weights = {linear: self._weights[linear]}

    def _select(self, linear: str) -> None:
        if linear not in available_linears():
            raise ValueError(f"GEMM library {linear!r} is not available here (have: {available_linears()})")
        gemm = LINEARS[linear]
        if linear not in self._weights:
            self._weights[linear] = [self._layer_weights(index, gemm) for index in range(len(self.layers))]
        self.linear, self._gemm, self._layer_weights_now = linear, gemm, self._weights[linear]

    def _layer_weights(self, index: int, gemm: Gemm) -> LayerWeights:
        layer, (qkv_weight, qkv_bias) = self.layers[index], self.qkv[index]
        hidden = self.heads * self.head_size
        first_only = self.head == "first" and index == len(self.layers) - 1

        def of(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gemm.prepare(weight), bias

        return LayerWeights(
            # the first-only last layer computes Q for first tokens and K, V for all: two products
            qkv=None if first_only else of(qkv_weight, qkv_bias),
            query=of(qkv_weight[:hidden], qkv_bias[:hidden]) if first_only else None,
            key_value=of(qkv_weight[hidden:], qkv_bias[hidden:]) if first_only else None,
            attention_output=of(layer.attention.output.dense.weight, layer.attention.output.dense.bias),
            intermediate=of(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
            output=of(layer.output.dense.weight, layer.output.dense.bias),
        )

    @property
    def reordered_bytes(self) -> int:
        """Memory held by weights in a GEMM library's own layout, beyond the model's."""
        if not self._gemm.reorders:
            return 0
        return sum(w.numel() * w.element_size() for layer in self._layer_weights_now for w in layer.matrices())

    @property
    def shape(self) -> tuple[Any, ...]:
        """What decides which GEMM library is faster: the encoder's sizes, dtype and head."""
        config = self.model.config
        return (
            config.hidden_size,
            config.intermediate_size,
            len(self.layers),
            self.heads,
            str(self.qkv[0][0].dtype),
            self.head,
        )

    def tune(self, items: Sequence[Features], gemms: Sequence[str] | None = None, rounds: int = 5) -> dict[str, float]:
        """Time a forward pass of ``items`` on each of ``gemms`` (default: every available
        GEMM library), in turns, and keep the faster; returns each one's fastest pass in ms.
        The fastest, not the median: a busy or shared host only ever adds time, and at load
        a median of three passes picked the slower library in one load of five on an Intel
        host with AMX, where that library took 14% longer over 100 rerank pairs (median of
        8 trials in turns). The order alternates between rounds, so neither library always
        runs first. Models of the same shape in one process take the first one's choice
        (and its figures) without timing again."""
        candidates = list(gemms or available_linears())
        known = _TUNED.get(self.shape)
        if known is not None and known[0] in candidates:
            self.use(known[0])
            return known[1]
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(rounds + 1):  # the first round warms up, untimed
            for name in candidates if r % 2 == 0 else reversed(candidates):
                self._select(name)
                start = time.perf_counter()
                self.outputs(items)
                if r:
                    times[name].append(time.perf_counter() - start)
        fastest = {name: round(min(t) * 1000, 2) for name, t in times.items()}
        self.use(min(fastest, key=fastest.__getitem__))
        _TUNED[self.shape] = (self.linear, fastest)
        return fastest

    # -- the heads ------------------------------------------------------------------------

    @torch.inference_mode()
    def hidden_states(self, items: Sequence[Features]) -> tuple[torch.Tensor, list[int]]:
        """The last layer's hidden states of every real token, packed ([tokens, hidden],
        the rows' tokens one after the other), and the rows' lengths."""
        batch = Batch.of([len(item["input_ids"]) for item in items])
        x = self._embed(items)
        for index in range(len(self.layers)):
            x = self._layer(index, x, batch)
        return x, batch.lengths

    @torch.inference_mode()
    def token_logits(self, items: Sequence[Features]) -> list[np.ndarray]:
        """Each row's [tokens, labels] logits (``BertForTokenClassification``)."""
        hidden, lengths = self.hidden_states(items)
        logits = self.model.classifier(hidden).float().numpy()  # dropout: identity in eval
        return np.split(logits, np.cumsum(lengths[:-1]))

    @torch.inference_mode()
    def sequence_logits(self, items: Sequence[Features]) -> torch.Tensor:
        """[rows, labels] logits (``BertForSequenceClassification``): the last layer runs
        for each row's first token only, which is all the pooler reads."""
        batch = Batch.of([len(item["input_ids"]) for item in items])
        x = self._embed(items)
        for index in range(len(self.layers) - 1):
            x = self._layer(index, x, batch)
        first = self._layer(len(self.layers) - 1, x, batch, first_only=True)
        assert self._first_head is not None
        dense, out = self._first_head
        return out(torch.tanh(dense(first)))  # dropout: identity in eval

    @torch.inference_mode()
    def outputs(self, items: Sequence[Features]) -> list[np.ndarray]:
        """The model's head output per row: logits for the classifiers; for ``BertModel``
        each row's [tokens, hidden] states (pooling is the caller's)."""
        if self.head == "tokens":
            return self.token_logits(items)
        if self.head == "first":
            return list(self.sequence_logits(items).float().numpy())
        hidden, lengths = self.hidden_states(items)
        return np.split(hidden.float().numpy(), np.cumsum(lengths[:-1]))

    @property
    def tolerance(self) -> float:
        """How far the packed pass may differ from the model's own (see ``matches``): 1e-4
        in float32. A 16-bit dtype rounds every product, differently in a padded batch and
        in a packed one: 4x its machine epsilon there (bfloat16: 0.031; float16: 0.0039),
        against 0.005 measured for bfloat16 on the test reranker. A bug in the pass (a
        wrong position, a wrong mask) shifts outputs by their whole size."""
        dtype = self.qkv[0][0].dtype
        return 1e-4 if dtype == torch.float32 else max(1e-4, 4 * torch.finfo(dtype).eps)

    @torch.inference_mode()
    def matches(
        self, items: Sequence[Features], padded: dict[str, torch.Tensor], atol: float | None = None
    ) -> float | None:
        """The largest difference from the model's own forward pass on ``padded`` (the
        same items, collated) over every real output, or None where it exceeds ``atol``
        (default: ``tolerance``). Outputs larger than 1 are compared relative to the
        largest of them: a token classifier's logits reach 10-100, where float32 already
        rounds at ~1e-5."""
        atol = self.tolerance if atol is None else atol
        theirs = self.model(**padded)[0].float().numpy()
        ours = self.outputs(items)
        if self.head == "first":
            real = [(np.stack(ours), theirs)]
        else:
            real = [(row, theirs[r, : len(row)]) for r, row in enumerate(ours)]
        scale = max(1.0, max(float(np.abs(b).max()) for _, b in real))
        worst = max(float(np.abs(a - b).max()) for a, b in real) / scale
        return worst if worst <= atol else None

    # -- the encoder ------------------------------------------------------------------------

    def _embed(self, items: Sequence[Features]) -> torch.Tensor:
        ids = torch.from_numpy(concat([item["input_ids"] for item in items]))
        if "token_type_ids" in items[0]:
            types = torch.from_numpy(concat([item["token_type_ids"] for item in items]))
        else:
            types = torch.zeros_like(ids)
        if self.padding_idx is None:
            positions = torch.cat([torch.arange(len(item["input_ids"])) for item in items])
        else:
            real = (ids != self.padding_idx).long()
            counts = torch.cat(
                [torch.cumsum(row, 0) for row in torch.split(real, [len(i["input_ids"]) for i in items])]
            )
            positions = counts * real + self.padding_idx
        emb = self.embeddings
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(types)
        return emb.LayerNorm(x)

    def _layer(self, index: int, x: torch.Tensor, batch: Batch, first_only: bool = False) -> torch.Tensor:
        """Encoder layer ``index`` on packed ``x``; with ``first_only``, the output of each
        row's first token only ([rows, hidden]): keys and values from every token, the rest
        from the first."""
        layer, weights, gemm = self.layers[index], self._layer_weights_now[index], self._gemm
        rows, width, heads, size = batch.rows, batch.width, self.heads, self.head_size
        hidden = heads * size
        if first_only:
            assert weights.query is not None and weights.key_value is not None
            kv = batch.to_grid(gemm.linear(x, *weights.key_value))
            kv = kv.view(rows, width, 2, heads, size).permute(2, 0, 3, 1, 4)
            x = x.index_select(0, batch.starts)
            query = gemm.linear(x, *weights.query).view(rows, 1, heads, size).transpose(1, 2)
            context = F.scaled_dot_product_attention(query, kv[0], kv[1], attn_mask=batch.mask, scale=self.scaling)
            context = context.transpose(1, 2).reshape(rows, hidden)
        else:
            assert weights.qkv is not None
            qkv = gemm.linear(x, *weights.qkv)
            if self.kernel is not None and qkv.dtype == torch.float32 and width <= self.kernel.max_width:
                context = self.kernel(qkv, batch, heads, size, self.scaling)
            else:
                grid = batch.to_grid(qkv).view(rows, width, 3, heads, size).permute(2, 0, 3, 1, 4)
                context = self._attention(grid[0], grid[1], grid[2], batch)
                context = batch.from_grid(context.transpose(1, 2).reshape(rows * width, hidden))
        # the residuals added in place
        x = layer.attention.output.LayerNorm(gemm.linear(context, *weights.attention_output).add_(x))
        if self._gelu is not None and gemm.fuses_gelu:
            intermediate = gemm.linear_gelu(x, *weights.intermediate, self._gelu)
        else:
            intermediate = layer.intermediate.intermediate_act_fn(gemm.linear(x, *weights.intermediate))
        return layer.output.LayerNorm(gemm.linear(intermediate, *weights.output).add_(x))

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Every token's attention over its row's real tokens: [rows, heads, width, size]."""
        if query.dtype == torch.float32 and batch.width <= MATMUL_ATTENTION_WIDTH:
            scores = torch.matmul(query, key.transpose(-1, -2)).mul_(self.scaling).add_(batch.bias)
            return torch.matmul(torch.softmax(scores, -1), value)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=batch.mask, scale=self.scaling)


MATMUL_ATTENTION_WIDTH = 64
"""Rows up to this many tokens take the unfused attention (float32 only). Measured on an
AMD EPYC (Zen 4), 2 threads, in turns with the fused kernel: 1.2-1.8x faster at 8-56
tokens, even at 64-80, slower from 96 (0.94x) and 128 (0.87x)."""


_TUNED: dict[tuple[Any, ...], tuple[str, dict[str, float]]] = {}
