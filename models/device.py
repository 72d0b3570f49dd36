"""Pick the torch device and dtype a worker runs on."""

from __future__ import annotations

import importlib.util

import torch


def resolve_device(requested: str) -> str:
    """``auto`` picks CUDA, then MPS, then the CPU; anything else must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {requested} asked for, but CUDA is not available")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device: {requested} asked for, but only {torch.cuda.device_count()} GPU(s)")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device: mps asked for, but MPS is not available")
    return requested


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def flash_attention_available(device: str) -> bool:
    """flash_attention_2 needs CUDA, torch >= 2 and the flash_attn package."""
    if not device.startswith("cuda"):
        return False
    major = int(torch.__version__.split(".")[0])
    return major >= 2 and importlib.util.find_spec("flash_attn") is not None


def prepare_device(device: str) -> None:
    """Process-wide settings for serving on ``device``; call once, before loading models.

    On CUDA, cuDNN's attention backend is taken out of SDPA's choices. cuDNN builds an
    execution plan for every new (batch, length) shape, at a CPU cost of milliseconds to
    hundreds of milliseconds each, and a server's batches come in hundreds of shapes (the
    dynamic batcher's rows x the longest input of each batch). SDPA then uses its
    flash and memory-efficient kernels, which need no per-shape plan.
    """
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
