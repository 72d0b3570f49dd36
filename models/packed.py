"""A padding-free forward pass for BERT- and RoBERTa-family encoder models on the CPU.

A server batches requests as they arrive, so the rows of a batch have mixed lengths, and
a padded forward pass computes the padding too: on the embed benchmark's sentences, a
batch of 31 taken in arrival order is 1.27x its real tokens, where a library sorting a
whole corpus by length first pads almost nothing. Here every token-wise operation (the
embeddings, the Q/K/V and output projections, the feed-forward matrices, the layer norms)
runs on the batch's real tokens only, packed into one [tokens, hidden] matrix. On a GPU
the padded forward pass is cheap and uses fused attention kernels, so this is for the CPU
only.

The attention of short rows (up to 64 tokens, in float32) runs on the packed tokens too,
in a C kernel (``AttentionKernel``: ``models/_packed_attention.c``, built at install,
AVX-512), 2.2x faster than torch's operations on the benchmarks' rows. Without it (not
built, no AVX-512, ``attention="torch"``), and for rows too long for it, the attention
runs on a padded [rows, heads, longest, head_dim] grid with the padding masked out as in
the model's own forward: for rows up to ``MATMUL_ATTENTION_WIDTH`` tokens in float32 as
two batched matrix products and a softmax rather than torch's fused CPU kernel
(``scaled_dot_product_attention``), which is built for long sequences (on rows of 19-40
tokens it took 1.2-1.8x as long); longer rows, 16-bit dtypes (whose fused kernel
accumulates the scores in float32) and the single query row of a classifier's last
layer keep the fused kernel.

It serves the three heads the encoder runtime loads, for BERT, RoBERTa and XLM-RoBERTa:

* ``*Model`` (embed): the last layer's hidden states of every token, for pooling;
* ``*ForTokenClassification`` (ner): the classifier on every token's hidden state;
* ``*ForSequenceClassification`` (rerank, classify): BERT's pooler and classifier, or
  RoBERTa's classification head, read only the first token's hidden state, so the last
  layer computes only that row: its keys and values still come from every token, but its
  query, attention output and feed-forward matrices run on one row per input instead of
  all of them (on 100 rerank pairs: 60.0 GFLOP instead of 69.3).

Its matrix products run on one of two CPU GEMM libraries inside torch: MKL (what
``nn.Linear`` calls) or oneDNN (``torch.ops.mkldnn._linear_pointwise``, as torch's compiler
emits for linear layers on the CPU). On oneDNN the weights are reordered once into its own
blocked layout (what the compiler's freezing does), and the feed-forward GELU runs inside
the first product. Which library is faster depends on the CPU: on AMD EPYCs oneDNN took
10-14% less time per forward pass, while an earlier session measured oneDNN's layers
(``torch.utils.mkldnn``) slower than ``nn.Linear`` on an Intel Xeon. So with
``linear="auto"`` the runtime times both on the model at load and keeps the faster
(``tune``). Q, K and V are one fused matrix product either way.

It reimplements the forward pass of transformers' ``BertModel`` and ``RobertaModel``
(eval mode, absolute positions, no cross-attention) from the model's own modules and
weights, so it applies to ``model_type`` bert, roberta and xlm-roberta only (MiniLM, BGE,
E5 and multilingual E5, the ms-marco and bge rerankers, most sentence-transformers
models), and the runtime checks it against the model's own forward pass at load before
using it (``matches``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.batcher import Features

# the heads this module reimplements, by class name (a subclass may change the forward
# pass): what each returns, and the attribute holding the encoder (None: the model is it)
_HEADS: dict[str, tuple[str, str | None]] = {}
for _family, _attr in (("Bert", "bert"), ("Roberta", "roberta"), ("XLMRoberta", "roberta")):
    _HEADS[f"{_family}Model"] = ("hidden", None)
    _HEADS[f"{_family}ForTokenClassification"] = ("tokens", _attr)
    _HEADS[f"{_family}ForSequenceClassification"] = ("first", _attr)
_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass
class _Batch:
    """Where a batch's packed tokens sit in the padded [rows, width] grid of the attention."""

    lengths: list[int]
    width: int
    slots: torch.Tensor  # packed token -> its place in the flattened grid
    pads: torch.Tensor  # the grid's padding places
    mask: torch.Tensor  # [rows, 1, 1, width]: True on real tokens
    starts: torch.Tensor  # packed index of each row's first token

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """The rows' lengths as an int64 tensor (for the attention kernel)."""
        return torch.tensor(self.lengths, dtype=torch.int64)

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """The mask as a float32 [rows, 1, 1, width] to add to attention scores: 0 on real
        tokens, -inf on the padding. Every row has a real token, so no softmax row is all
        -inf."""
        return torch.zeros(self.mask.shape).masked_fill_(~self.mask, float("-inf"))

    @classmethod
    def of(cls, lengths: list[int]) -> _Batch:
        real = _real_tokens(lengths)
        starts = torch.tensor([0, *np.cumsum(lengths[:-1]).tolist()], dtype=torch.long)
        flat = real.view(-1)
        return cls(
            lengths,
            max(lengths),
            flat.nonzero().squeeze(1),
            (~flat).nonzero().squeeze(1),
            real.unsqueeze(1).unsqueeze(1),
            starts,
        )

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def to_grid(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, n] to a zero-padded [rows * width, n]. The padding is zeroed, not left
        uninitialised: the attention masks it out, but a NaN there would still reach the
        output through the zero weights times its values. (Copying into an empty grid and
        zeroing only the padding took 55-66% of the time of zeroing the whole grid and
        indexing into it, for 64 rows of 25-35 tokens.)"""
        grid = packed.new_empty(self.rows * self.width, packed.shape[1])
        grid.index_copy_(0, self.slots, packed)
        if len(self.pads):
            grid.index_fill_(0, self.pads, 0)
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows * width, n] back to the packed [tokens, n]."""
        return grid.index_select(0, self.slots)


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
        self.qkv = [_fuse_qkv(layer.attention.self) for layer in self.layers]
        # oneDNN fuses the feed-forward activation where it has it (exact or tanh GELU)
        self._gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(
            getattr(model.config, "hidden_act", None)  # type: ignore[arg-type]
        )
        self._weights: dict[str, list[_LayerWeights]] = {}  # by GEMM library, made on first use
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

    def _layer_weights(self, index: int, gemm: _Gemm) -> _LayerWeights:
        layer, (qkv_weight, qkv_bias) = self.layers[index], self.qkv[index]
        hidden = self.heads * self.head_size
        first_only = self.head == "first" and index == len(self.layers) - 1

        def of(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gemm.prepare(weight), bias

        return _LayerWeights(
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
        batch = _Batch.of([len(item["input_ids"]) for item in items])
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
        batch = _Batch.of([len(item["input_ids"]) for item in items])
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
        ids = torch.from_numpy(_concat([item["input_ids"] for item in items]))
        if "token_type_ids" in items[0]:
            types = torch.from_numpy(_concat([item["token_type_ids"] for item in items]))
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

    def _layer(self, index: int, x: torch.Tensor, batch: _Batch, first_only: bool = False) -> torch.Tensor:
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

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Every token's attention over its row's real tokens: [rows, heads, width, size]."""
        if query.dtype == torch.float32 and batch.width <= MATMUL_ATTENTION_WIDTH:
            scores = torch.matmul(query, key.transpose(-1, -2)).mul_(self.scaling).add_(batch.bias)
            return torch.matmul(torch.softmax(scores, -1), value)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=batch.mask, scale=self.scaling)


MATMUL_ATTENTION_WIDTH = 64
"""Rows up to this many tokens take the unfused attention (float32 only). Measured on an
AMD EPYC (Zen 4), 2 threads, in turns with the fused kernel: 1.2-1.8x faster at 8-56
tokens, even at 64-80, slower from 96 (0.94x) and 128 (0.87x)."""


def _fuse_qkv(attention: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, K and V as one [3 * hidden, hidden] matrix (rows: Q, then K, then V) and its bias.
    The three layers' own weights become views of it, so the model's own forward pass is
    unchanged and the weights are not held twice."""
    parts = (attention.query, attention.key, attention.value)
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts]).contiguous()
        bias = torch.cat([p.bias for p in parts]).contiguous()
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        part.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


@dataclass(frozen=True)
class _LayerWeights:
    """One encoder layer's matrices (each with its bias) in the form a GEMM library takes.
    ``qkv`` serves every layer but a sequence classifier's last, which takes ``query`` and
    ``key_value`` instead (see ``PackedBert.sequence_logits``)."""

    qkv: tuple[torch.Tensor, torch.Tensor] | None
    query: tuple[torch.Tensor, torch.Tensor] | None
    key_value: tuple[torch.Tensor, torch.Tensor] | None
    attention_output: tuple[torch.Tensor, torch.Tensor]
    intermediate: tuple[torch.Tensor, torch.Tensor]
    output: tuple[torch.Tensor, torch.Tensor]

    def matrices(self) -> list[torch.Tensor]:
        pairs = (self.qkv, self.query, self.key_value, self.attention_output, self.intermediate, self.output)
        return [pair[0] for pair in pairs if pair is not None]


class _Gemm:
    """A CPU GEMM library as the packed pass calls it: ``torch`` (MKL, what ``nn.Linear``
    calls), on the model's own weights."""

    reorders = False  # holds its own copy of the weights
    fuses_gelu = False

    @staticmethod
    def prepare(weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ([out, in]) in the form ``linear`` takes."""
        return weight

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, algorithm: str) -> torch.Tensor:
        raise NotImplementedError


class _OneDnnGemm(_Gemm):
    """oneDNN through the ops torch's compiler emits for the CPU: the weights reordered
    once into oneDNN's blocked layout (bit-identical results; 4-8% less time on the
    model's products for 300-3,200 rows, 20-25% less for 30 rows, on an AMD EPYC), and the
    GELU done inside the product. (Its residual add inside the product was no faster than
    an add in place after it.)"""

    reorders = True
    fuses_gelu = True

    @staticmethod
    def prepare(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, algorithm: str) -> torch.Tensor:
        """``algorithm``: "none" (exact GELU) or "tanh"."""
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], algorithm)


LINEARS: dict[str, _Gemm] = {"torch": _Gemm(), "onednn": _OneDnnGemm()}
"""The GEMM libraries a packed forward pass can run its matrix products on."""


class AttentionKernel:
    """``models/_packed_attention.c``, built at install (see pyproject.toml): the attention
    of rows of up to ``max_width`` tokens straight from the packed Q/K/V product into the
    packed context, without torch's padded grid, copies and small batched products (2.2x
    less time per layer for 64 rows of 25-34 tokens on an AMD EPYC)."""

    max_width = 64  # MAX_WIDTH in the C source
    max_size = 128  # MAX_SIZE

    def takes_head_size(self, size: int) -> bool:
        return size % 16 == 0 and 16 <= size <= self.max_size

    def __init__(self, library: ctypes.CDLL) -> None:
        self._run = library.packed_attention
        self._run.restype = ctypes.c_int
        self._run.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        )

    def __call__(self, qkv: torch.Tensor, batch: _Batch, heads: int, size: int, scaling: float) -> torch.Tensor:
        """[tokens, 3 * heads * size] float32 to the context, [tokens, heads * size]."""
        qkv = qkv.contiguous()
        out = qkv.new_empty(qkv.shape[0], heads * size)
        starts, counts = batch.starts, batch.counts
        status = self._run(
            qkv.data_ptr(),
            starts.data_ptr(),
            counts.data_ptr(),
            batch.rows,
            heads,
            size,
            scaling,
            torch.get_num_threads(),
            out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(
                f"packed attention kernel refused {batch.rows} rows of width {batch.width}, head size {size}"
            )
        return out


@functools.cache
def attention_kernel() -> AttentionKernel | None:
    """The attention kernel, or None where it was not built (no C compiler at install) or
    the CPU lacks AVX-512. Loaded after torch, so it takes torch's OpenMP runtime."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(f"_packed_attention{suffix}")
        if path.exists():
            library = ctypes.CDLL(str(path))
            return AttentionKernel(library) if library.packed_attention_supported() else None
    return None


_TUNED: dict[tuple[Any, ...], tuple[str, dict[str, float]]] = {}


@functools.cache
def available_linears() -> list[str]:
    """``torch`` always; ``onednn`` where this torch build has its linear op (a private op
    of torch's compiler, so checked, never assumed)."""
    names = ["torch"]
    try:
        if torch.backends.mkldnn.is_available():
            gemm, probe = LINEARS["onednn"], torch.ones(2, 4)
            weight = gemm.prepare(torch.ones(3, 4))
            gemm.linear(probe, weight, torch.zeros(3))
            names.append("onednn")
    except (AttributeError, RuntimeError):
        pass
    return names


def unpack(hidden: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed hidden states back into a zero-padded [rows, longest, dim] tensor, and its
    attention mask, for the pooling of the padded forward pass (``models.pooling.pool``)."""
    mask = _real_tokens(lengths)
    grid = hidden.new_zeros(len(lengths), max(lengths), hidden.shape[1])
    grid[mask] = hidden
    return grid, mask.long()


def _real_tokens(lengths: list[int]) -> torch.Tensor:
    """[rows, longest] booleans: True where a row has a token, False on its padding."""
    return torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _concat(arrays: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])
