"""Device preparation (models/device.py)."""

from __future__ import annotations


def test_a_cuda_worker_keeps_cudnn_out_of_attention() -> None:
    """cuDNN's SDPA builds a plan per new batch shape (measured on an H200: 45-60 ms of CPU
    per new shape, against 3.4 ms a forward without it), and a dynamic batcher makes
    hundreds of shapes: a CUDA worker turns it off, a CPU worker leaves torch alone."""
    import torch

    from models.device import prepare_device

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        prepare_device("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        prepare_device("cuda:1")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
