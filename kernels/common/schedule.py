"""The learning-rate schedule: linear warmup to the peak, then cosine to a floor, WSD or constant."""
from __future__ import annotations

import math
from typing import Literal


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int,
          schedule: Literal["cosine", "wsd", "constant"], min_lr_ratio: float,
          decay_fraction: float | None = None) -> float:
    """The lr of optimizer step `step` (0-based) of `max_steps`: `lr` * (step + 1) / warmup_steps during warmup;
    then cosine down to the floor lr * min_lr_ratio, or WSD (flat, then a linear decay to the floor over the last
    `decay_fraction` of the steps; WSD only), or flat. Cosine and WSD give the last step that runs, max_steps - 1,
    the floor."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps)
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if decay_fraction is None:
        raise ValueError("schedule='wsd' needs decay_fraction, the share of steps in the final decay")
    decay_start = max_steps - round(decay_fraction * max_steps)
    if step < decay_start:
        return lr
    return lr - (lr - floor) * (step - decay_start + 1) / max(1, max_steps - decay_start)
