"""Learning-rate schedules: linear warmup, then cosine / linear decay or constant."""

from __future__ import annotations

import math

import torch

from pyfast.train.config import OptimConfig


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update numbered `step` (0-based) of `total`.

    Warmup ramps linearly over `warmup` updates ((step + 1) / warmup, so the first update is not
    wasted at lr 0); afterwards 'cosine' follows half a cosine and 'linear' a straight line from 1
    down to `min_ratio` at the last update, and 'constant' stays at 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    """A ``LambdaLR`` over :func:`lr_factor` (its state_dict is just the step count)."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio),
    )
