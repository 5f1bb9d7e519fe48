"""Chooses, per call, between the compiled kernel and its pure-PyTorch twin."""

from __future__ import annotations

import torch

from pyfast._extension import HAS_C, HAS_CUDA_KERNELS


def use_kernel(device: torch.device) -> bool:
    """True when torch.ops.pyfast has an implementation for tensors on `device`."""
    if not HAS_C:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and HAS_CUDA_KERNELS
