"""Where a batch's packed tokens sit: the rows' tokens one after the other in a
[tokens, hidden] matrix, and, for the attention that needs it, in a padded
[rows, width] grid."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
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
    def of(cls, lengths: list[int]) -> Batch:
        real = real_tokens(lengths)
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


def unpack(hidden: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed hidden states back into a zero-padded [rows, longest, dim] tensor, and its
    attention mask, for the pooling of the padded forward pass (``models.pooling.pool``)."""
    mask = real_tokens(lengths)
    grid = hidden.new_zeros(len(lengths), max(lengths), hidden.shape[1])
    grid[mask] = hidden
    return grid, mask.long()


def real_tokens(lengths: list[int]) -> torch.Tensor:
    """[rows, longest] booleans: True where a row has a token, False on its padding."""
    return torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def concat(arrays: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])
