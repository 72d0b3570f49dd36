"""The binding of the C attention kernel for short rows (``models/_packed_attention.c``):
an optional part of the install, used where it was built and the CPU has AVX-512, and
checked against torch's attention by the tests."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import torch

from models.packed.batch import Batch


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

    def __call__(self, qkv: torch.Tensor, batch: Batch, heads: int, size: int, scaling: float) -> torch.Tensor:
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
        path = Path(__file__).parent.parent / f"_packed_attention{suffix}"  # models/, where setup.py builds it
        if path.exists():
            library = ctypes.CDLL(str(path))
            return AttentionKernel(library) if library.packed_attention_supported() else None
    return None
