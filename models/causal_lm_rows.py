"""Transformers causal LMs, several generations decoded together (``parallel`` > 1).

Requests join the running batch at a decode-step boundary, in the model's own KV cache
(``DynamicCache``): the prompts of the requests that arrive for the same step are
evaluated together in one left-padded pass (those of similar length; a lone request's
prompt on its own, as ``generate`` evaluates it), then their cache is joined to the
batch's as more rows, left-padded to the batch's length (the padding masked out, each
row's positions its own). Each step is one forward pass of one token
per row; a row leaves the moment its generation ends, and padding no row needs any more
is trimmed. Sliding-window layers (Gemma 3) keep their window: their cache is joined
and trimmed by the same rule.

Why not transformers' own continuous batching (``init_continuous_batching`` /
``generate_batch``): on a CPU its paged-attention machinery costs more than it saves
(eight prompts of 21 tokens, 32 new tokens each, on a 4-layer model: ``generate_batch``
took longer than eight ``generate`` calls one after another, and 25 times as long as one
padded ``generate``); its sampling settings are the manager's, not each request's; and
its per-token output has no place for our stop strings and deadlines. This is the
smallest thing that does all of it: about as fast as a padded ``generate`` per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, TextStreamer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models.continuous import Sequence


class TextPieces(TextStreamer):
    """One generation's tokens to text, as ``TextIteratorStreamer`` gives it to
    ``generate``'s callers (whole words, special tokens skipped), a token at a time."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self._out: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._out.append(text)

    def feed(self, token: int) -> str:
        self.put(torch.tensor([token]))
        return self._take()

    def flush(self) -> str:
        self.end()
        return self._take()

    def _take(self) -> str:
        text = "".join(self._out)
        self._out.clear()
        return text


@dataclass(eq=False)
class _Row:
    warpers: LogitsProcessorList | None  # None: greedy
    generator: torch.Generator | None
    joined: bool = False
    pending: int = -1  # sampled, not yet in the cache


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (batch, heads, tokens, dim) with zeros before its tokens, to ``length``."""
    missing = length - t.shape[-2]
    if missing <= 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], missing, t.shape[-1]), t], dim=-2)


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


# A step's new prompts are evaluated together where the padding costs little: a group's
# padded tokens at most PAD_BUDGET times its real ones, and at most MAX_TOKENS (a longer
# prompt goes on its own).
PREFILL_PAD_BUDGET = 1.5
PREFILL_MAX_TOKENS = 4096


def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """The generations new in a step, in groups whose prompts go in one forward pass: the
    longest first, each joined by the next longest while the padding stays in budget."""
    groups: list[list[Sequence]] = []
    real = 0  # the last group's prompt tokens
    for seq in sorted(seqs, key=lambda s: s.prompt_tokens, reverse=True):
        real += seq.prompt_tokens
        if groups:
            padded = groups[-1][0].prompt_tokens * (len(groups[-1]) + 1)
            if padded <= PREFILL_MAX_TOKENS and padded <= PREFILL_PAD_BUDGET * real:
                groups[-1].append(seq)
                continue
        groups.append([seq])
        real = seq.prompt_tokens
    return groups


class CacheRows:
    """The generations of one causal LM as rows of one left-padded KV cache (the
    ``Backend`` of models/continuous.py)."""

    def __init__(self, model: Any, tokenizer: Any, device: str, eos_ids: set[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out
        self._clear()

    def _clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.rows: list[Sequence] = []  # in the cache's order
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # 1: a real token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's next position

    def decoder(self) -> TextPieces:
        return TextPieces(self.tokenizer)

    def is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def start(self, seq: Sequence) -> None:
        params = seq.params
        if params.temperature == 0:
            seq.slot = _Row(None, None)
            return
        warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.slot = _Row(warpers, generator)

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        sampled: list[tuple[Sequence, int]] = []
        with torch.inference_mode():
            for group in prefill_groups([seq for seq in seqs if not seq.slot.joined]):
                logits, cache, mask = self._prefill([seq.prompt_ids for seq in group])
                for seq, token in zip(group, self._sample(group, logits), strict=True):
                    seq.slot.pending = token
                    sampled.append((seq, token))
                self._join(group, cache, mask)
            if self.rows:
                ids = torch.tensor([[seq.slot.pending] for seq in self.rows], device=self.device)
                mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=self.positions[:, None],
                    cache=self.cache,
                    use_cache=True,
                )
                self.mask = mask
                self.positions = self.positions + 1
                for seq, token in zip(self.rows, self._sample(self.rows, out.logits[:, -1]), strict=True):
                    seq.slot.pending = token
                    sampled.append((seq, token))
        return sampled

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Prompts evaluated together, left-padded to the longest: each one's last logits,
        their cache and its mask (1: a real token). One prompt goes as ``generate``
        evaluates it."""
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra: dict[str, Any] = {}
        if len(prompts) > 1:  # each row's positions count its own tokens, from 0
            extra["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1], cache, mask

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token: the argmax for greedy rows, else its own warpers and draw."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, seq in enumerate(seqs):
            row: _Row = seq.slot
            if row.warpers is None:
                tokens.append(int(greedy[i]))
                continue
            scores = row.warpers(None, logits[i : i + 1].clone())
            probs = torch.softmax(scores, dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)[0, 0]))
        return tokens

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled generations' cache (one row each, ``mask`` its real tokens) to the
        batch's, as its last rows."""
        lengths = mask.sum(dim=1)
        for seq in seqs:
            seq.slot.joined = True
        if not self.rows:
            self.cache = cache
            self.mask = mask
            self.positions = lengths
            self.rows = list(seqs)
            return
        assert self.cache is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            if not getattr(theirs, "is_initialized", False) or not getattr(mine, "is_initialized", False):
                continue  # a layer that keeps no cache of its own (shared key/values)
            # each row keeps the same number of trailing tokens: all of them in a full
            # layer, the window in a sliding one (where min(width, window) is the larger)
            keep = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_left_pad(mine.keys, keep), _left_pad(theirs.keys, keep)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, keep), _left_pad(theirs.values, keep)], dim=0)
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = width
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], dim=0)
        self.positions = torch.cat([self.positions, lengths])
        self.rows.extend(seqs)

    def release(self, seq: Sequence) -> None:
        """Drop a generation's row, then the padding no row needs any more."""
        row: _Row | None = seq.slot
        seq.slot = None
        if row is None or not row.joined:
            return
        index = self.rows.index(seq)
        keep = [i for i in range(len(self.rows)) if i != index]
        if not keep:
            self._clear()
            return
        assert self.cache is not None
        picked = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[picked]
        self.positions = self.positions[picked]
        lead = int(self.mask.cumsum(dim=1).eq(0).sum(dim=1).min())  # columns of padding in every row
        width = self.mask.shape[1] - lead
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            tokens = min(layer.keys.shape[-2], width)
            layer.keys = layer.keys[picked, :, layer.keys.shape[-2] - tokens :]
            layer.values = layer.values[picked, :, layer.values.shape[-2] - tokens :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width

    def reset(self) -> None:
        for seq in self.rows:
            seq.slot = None
        self._clear()
