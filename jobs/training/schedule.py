"""Learning-rate schedule: linear warm-up, then cosine decay (to
`min_ratio` × the base LR) or constant.

A pure function of the step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math

from dheads.platform.config import LRSchedule


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                  schedule: LRSchedule | str = LRSchedule.cosine, min_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based: the first update uses step 0)."""
    schedule = LRSchedule(schedule)
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule is LRSchedule.constant:
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["LRSchedule", "learning_rate"]
