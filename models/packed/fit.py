"""Fitting the packed pass to a loaded model: whether it applies, whether it gives the
model's own results (checked against the model's own forward pass, on each GEMM library),
and which of the libraries that do is the faster here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog
import torch

from models.batcher import Features
from models.packed.bert import PackedBert
from models.packed.gemm import available_linears

log = structlog.get_logger("models.encoder")


def fit_packed(
    model: Any,
    *,
    alias: str,
    gemm: str,
    attention: str,
    check: Sequence[Features],
    padded: dict[str, torch.Tensor],
    tuning_sample: Callable[[], list[Features]],
) -> PackedBert | None:
    """The packed runner for ``model``, or None where it does not apply or gives other
    results. ``check``, and ``padded`` (the same items collated): what it is checked on;
    ``tuning_sample``: a typical batch to time the GEMM libraries on, where several pass."""
    try:
        packed = PackedBert.for_model(model, gemm, attention)
    except RuntimeError as exc:  # e.g. oneDNN cannot reorder float16 weights on this CPU
        log.warning("encoder.packed_off", model=alias, reason=str(exc).split(".")[0])
        return None
    if packed is None:
        return None
    gemms = [packed.linear] if gemm != "auto" else available_linears()
    differences: dict[str, float] = {}
    for name in gemms:
        try:
            packed.use(name)
            worst = packed.matches(check, padded)
        except RuntimeError as exc:  # e.g. oneDNN has no float16 GEMM on this CPU
            log.info("encoder.packed_gemm_unusable", model=alias, gemm=name, error=str(exc).split(".")[0])
            continue
        if worst is not None:
            differences[name] = worst
    if not differences:
        reason = "no GEMM library here gives the model's own forward pass in its dtype"
        log.warning("encoder.packed_off", model=alias, reason=reason, gemms=gemms)
        return None
    timings: dict[str, float] = {}
    if len(differences) > 1:
        timings = packed.tune(tuning_sample(), list(differences))
    else:
        packed.use(next(iter(differences)))
    log.info(
        "encoder.packed",
        model=alias,
        gemm=packed.linear,
        max_difference=differences[packed.linear],
        reordered_weights_mib=round(packed.reordered_bytes / 2**20, 1),
        attention="kernel" if packed.kernel is not None else "torch",
        **{f"forward_ms_{name}": ms for name, ms in timings.items()},
    )
    return packed
