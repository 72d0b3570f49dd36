"""Sentence pooling as sentence-transformers does it, read from the model folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


@dataclass(frozen=True)
class PoolingConfig:
    cls: bool = False
    mean: bool = True
    max: bool = False
    mean_sqrt_len: bool = False
    last_token: bool = False
    normalize: bool = False  # the folder ends in a Normalize module
    max_seq_length: int | None = None

    @property
    def modes(self) -> list[str]:
        order = ("cls", "max", "mean", "mean_sqrt_len", "last_token")
        return [m for m in order if getattr(self, m)]


def read_pooling_config(folder: str) -> PoolingConfig:
    """The pooling of a sentence-transformers folder; mean pooling for any other model."""
    root = Path(folder)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig()
    modules = json.loads(modules_file.read_text())
    unsupported = [m["type"] for m in modules if m.get("type") not in _SUPPORTED_MODULES]
    if unsupported:
        # A Dense or other module changes the vectors; serving without it would be silently wrong.
        raise ValueError(f"source: sentence-transformers module(s) {unsupported} are not supported")
    kwargs: dict[str, object] = {"normalize": any(m["type"].endswith(".Normalize") for m in modules)}
    for module in modules:
        if module["type"].endswith(".Pooling"):
            cfg = json.loads((root / module["path"] / "config.json").read_text())
            kwargs.update(
                cls=cfg.get("pooling_mode_cls_token", False),
                mean=cfg.get("pooling_mode_mean_tokens", False),
                max=cfg.get("pooling_mode_max_tokens", False),
                mean_sqrt_len=cfg.get("pooling_mode_mean_sqrt_len_tokens", False),
                last_token=cfg.get("pooling_mode_lasttoken", False),
            )
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        kwargs["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    config = PoolingConfig(**kwargs)  # type: ignore[arg-type]
    if not config.modes:
        raise ValueError("source: the Pooling module enables no pooling mode")
    return config


def _mean_pooling(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = torch.sum(token_embeddings * mask, dim=1)
    counts = torch.clamp(mask.sum(dim=1), min=1e-9)
    return summed / counts


def pool(config: PoolingConfig, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, dim] -> [batch, dim * modes], padding ignored."""
    parts: list[torch.Tensor] = []
    for mode in config.modes:
        if mode == "cls":
            parts.append(token_embeddings[:, 0])
        elif mode == "max":
            masked = token_embeddings.masked_fill(attention_mask.unsqueeze(-1) == 0, -1e9)
            parts.append(masked.max(dim=1).values)
        elif mode == "mean":
            parts.append(_mean_pooling(token_embeddings, attention_mask))
        elif mode == "mean_sqrt_len":
            mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
            summed = torch.sum(token_embeddings * mask, dim=1)
            parts.append(summed / torch.sqrt(torch.clamp(mask.sum(dim=1), min=1e-9)))
        elif mode == "last_token":
            # right padding: the last real token sits at length - 1
            last = attention_mask.sum(dim=1) - 1
            parts.append(token_embeddings[torch.arange(token_embeddings.size(0)), last])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
