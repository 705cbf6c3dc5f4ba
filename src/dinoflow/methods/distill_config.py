"""Distillation configuration as data (pydantic, no torch import: the distill stage spec embeds it).

DINOv2 Sec. 5: the pretraining loop with a frozen large teacher, no masking, no stochastic depth
in the student, the iBOT loss on the global crops' patch tokens, and an EMA of the student kept as
the final model.
"""

from __future__ import annotations

from pydantic import Field

from dinoflow.methods.config import DINOObjectiveConfig


class DistillConfig(DINOObjectiveConfig):
    """The DINOv2 objective against a frozen teacher, plus the students' EMA."""

    teacher_temp: float = Field(
        0.07, gt=0, description="fixed: a frozen pretrained teacher is past DINOv2's 0.04 -> 0.07 warm-up"
    )
    ibot_loss_weight: float = Field(
        1.0,
        ge=0,
        description="iBOT on every patch of the global crops (no masking); 0 lets patch grids differ",
    )
    ema_momentum_start: float = Field(0.992, ge=0, le=1, description="student EMA, DINOv2's teacher schedule")
    ema_momentum_end: float = Field(1.0, ge=0, le=1)
