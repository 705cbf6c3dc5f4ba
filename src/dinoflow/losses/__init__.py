"""Losses and heads, one small module each: DINO head, DINO CLS loss, Sinkhorn-Knopp / EMA centering,
iBOT patch loss, KoLeo, and the teacher-temperature / cosine schedules."""

from dinoflow.losses.centering import EMACenter, sinkhorn_knopp
from dinoflow.losses.dino_head import DINOHead
from dinoflow.losses.dino_loss import DINOLoss
from dinoflow.losses.ibot_loss import IBOTPatchLoss
from dinoflow.losses.koleo import KoLeoLoss
from dinoflow.losses.schedules import cosine, teacher_temperature

__all__ = [
    "DINOHead",
    "DINOLoss",
    "EMACenter",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "cosine",
    "sinkhorn_knopp",
    "teacher_temperature",
]
