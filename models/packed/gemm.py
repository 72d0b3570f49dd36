"""The packed pass's matrix products: Q, K and V fused into one matrix, each layer's
weights in the form a GEMM library takes, and the two CPU GEMM libraries inside torch,
MKL (``torch``) and oneDNN (``onednn``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def fuse_qkv(attention: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
class LayerWeights:
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


class Gemm:
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


class OneDnnGemm(Gemm):
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


LINEARS: dict[str, Gemm] = {"torch": Gemm(), "onednn": OneDnnGemm()}
"""The GEMM libraries a packed forward pass can run its matrix products on."""


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
