"""Schedules as plain functions of the training position (no state, so resume is exact)."""

from __future__ import annotations

import math


def cosine(
    step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then cosine to ``end``."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / max(1, warmup)
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """DINOv2: teacher temperature warms up linearly 0.04 -> 0.07 (over 30 epochs), then stays."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / max(1, warmup_steps)
