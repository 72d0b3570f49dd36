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
10-14% less time per forward pass, while on an Intel Xeon oneDNN's layers
(``torch.utils.mkldnn``) were slower than ``nn.Linear``. So with
``linear="auto"`` the runtime times both on the model at load and keeps the faster
(``tune``). Q, K and V are one fused matrix product either way.

It reimplements the forward pass of transformers' ``BertModel`` and ``RobertaModel``
(eval mode, absolute positions, no cross-attention) from the model's own modules and
weights, so it applies to ``model_type`` bert, roberta and xlm-roberta only (MiniLM, BGE,
E5 and multilingual E5, the ms-marco and bge rerankers, most sentence-transformers
models), and the runtime checks it against the model's own forward pass at load before
using it (``matches``).

The package, by concept: ``batch.py`` (where packed tokens sit in the padded grid),
``gemm.py`` (the fused Q/K/V weights and the two GEMM libraries), ``kernel.py`` (the C
attention kernel's binding) and ``bert.py`` (the forward pass and its heads).
"""

from __future__ import annotations

from models.packed.batch import Batch, unpack
from models.packed.bert import MATMUL_ATTENTION_WIDTH, PackedBert
from models.packed.gemm import LINEARS, available_linears
from models.packed.kernel import AttentionKernel, attention_kernel

__all__ = [
    "LINEARS",
    "MATMUL_ATTENTION_WIDTH",
    "AttentionKernel",
    "Batch",
    "PackedBert",
    "attention_kernel",
    "available_linears",
    "unpack",
]
