"""A padding-free forward pass for BERT-family embedding models on the CPU.

A server batches requests as they arrive, so the rows of a batch have mixed lengths, and
a padded forward pass computes the padding too: on the embed benchmark's sentences, a
batch of 31 taken in arrival order is 1.27x its real tokens, where a library sorting a
whole corpus by length first pads almost nothing. Here every token-wise operation (the
embeddings, the Q/K/V and output projections, the feed-forward matrices, the layer norms)
runs on the batch's real tokens only, packed into one [tokens, hidden] matrix; only the
attention itself runs on a padded [rows, heads, longest, head_dim] grid, with the padding
masked out as in the model's own forward. On a GPU the padded forward pass is cheap and
uses fused attention kernels, so this is for the CPU only.

It reimplements the forward pass of transformers' ``BertModel`` (eval mode, absolute
positions, no cross-attention) from the model's own modules and weights, so it applies to
``model_type == "bert"`` only (MiniLM, BGE, E5 and most sentence-transformers encoders),
and the runtime checks it against the model's own forward pass at load before using it
(``matches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.batcher import Features


class PackedBert:
    """Runs a ``BertModel`` on a list of token id sequences without padding them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.embeddings = model.embeddings
        self.layers = list(model.encoder.layer)
        attention = self.layers[0].attention.self
        self.heads = attention.num_attention_heads
        self.head_size = attention.attention_head_size
        self.scaling = getattr(attention, "scaling", self.head_size**-0.5)

    @classmethod
    def for_model(cls, model: Any) -> PackedBert | None:
        """The packed runner for ``model`` (an ``AutoModel``), or None where it does not apply."""
        config = getattr(model, "config", None)
        if (
            config is None
            or getattr(config, "model_type", None) != "bert"
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or getattr(config, "is_decoder", False)
            or getattr(config, "add_cross_attention", False)
            or getattr(config, "chunk_size_feed_forward", 0)
            or not hasattr(model, "embeddings")
            or not hasattr(model, "encoder")
        ):
            return None
        return cls(model)

    @torch.inference_mode()
    def hidden_states(self, items: Sequence[Features]) -> tuple[torch.Tensor, list[int]]:
        """The last layer's hidden states of every real token, packed ([tokens, hidden],
        the rows' tokens one after the other), and the rows' lengths."""
        lengths = [len(item["input_ids"]) for item in items]
        rows, width = len(items), max(lengths)
        ids = torch.from_numpy(_concat([item["input_ids"] for item in items]))
        if "token_type_ids" in items[0]:
            types = torch.from_numpy(_concat([item["token_type_ids"] for item in items]))
        else:
            types = torch.zeros_like(ids)
        positions = torch.cat([torch.arange(n) for n in lengths])
        # where each packed token sits in the padded [rows, width] grid of the attention
        real = _real_tokens(lengths)
        slots = real.view(-1).nonzero().squeeze(1)
        mask = real.view(rows, 1, 1, width)

        emb = self.embeddings
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(types)
        x = emb.LayerNorm(x)
        hidden = self.heads * self.head_size
        for layer in self.layers:
            attention = layer.attention.self
            qkv = torch.cat([attention.query(x), attention.key(x), attention.value(x)], dim=1)
            grid = qkv.new_zeros(rows * width, 3 * hidden)
            grid[slots] = qkv
            grid = grid.view(rows, width, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4)
            context = F.scaled_dot_product_attention(grid[0], grid[1], grid[2], attn_mask=mask, scale=self.scaling)
            context = context.transpose(1, 2).reshape(rows * width, hidden)[slots]
            out = layer.attention.output
            x = out.LayerNorm(out.dense(context) + x)
            intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            out = layer.output
            x = out.LayerNorm(out.dense(intermediate) + x)
        return x, lengths

    @torch.inference_mode()
    def matches(self, items: Sequence[Features], padded: dict[str, torch.Tensor], atol: float = 1e-4) -> float | None:
        """The largest difference from the model's own forward pass on ``padded`` (the
        same items, collated), or None where it exceeds ``atol``."""
        theirs = self.model(**padded)[0]
        ours, mask = unpack(*self.hidden_states(items))
        worst = float((ours - theirs).abs().masked_fill(mask.unsqueeze(-1) == 0, 0).max())
        return worst if worst <= atol else None


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
