"""Method configuration as data (pydantic, no torch import: stage specs embed these).

Defaults are the official DINOv2 ``ssl_default_config.yaml`` values unless a comment says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CropsConfig(_Cfg):
    """Multi-crop augmentation (DINOv2: 2 x 224 px global, 8 x 96/98 px local)."""

    global_crops_number: int = Field(2, ge=1, description="global crops per image (teacher + student)")
    global_crop_px: int = Field(224, ge=4)
    global_scale_min: float = Field(0.32, gt=0, le=1)
    global_scale_max: float = Field(1.0, gt=0, le=1)
    local_crops_number: int = Field(8, ge=0, description="local crops per image (student only)")
    local_crop_px: int = Field(98, ge=4, description="96 in DINOv2, 98 for patch-14 models")
    local_scale_min: float = Field(0.05, gt=0, le=1)
    local_scale_max: float = Field(0.32, gt=0, le=1)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    solarize_p: float = Field(0.2, ge=0, le=1)
    blur_p_global1: float = Field(1.0, ge=0, le=1)
    blur_p_global2: float = Field(0.1, ge=0, le=1)
    blur_p_local: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> CropsConfig:
        if self.global_scale_min > self.global_scale_max or self.local_scale_min > self.local_scale_max:
            raise ValueError("crop scale ranges need min <= max")
        if self.global_crops_number < 2 and self.local_crops_number == 0:
            raise ValueError("DINO needs >= 2 global crops or >= 1 local crop")
        return self


class DINOObjectiveConfig(_Cfg):
    """The loss terms shared by DINOv2 pretraining and distillation: DINO (CLS) + iBOT (patches) +
    KoLeo, teacher targets centred by Sinkhorn-Knopp or an EMA centre."""

    student_temp: float = Field(0.1, gt=0, description="DINOv2 student temperature")
    centering: Literal["sinkhorn_knopp", "ema"] = Field("sinkhorn_knopp", description="DINOv2 default")
    sinkhorn_iters: int = Field(3, ge=1, description="DINOv2 default")
    center_momentum: float = Field(0.9, ge=0, le=1, description="EMA centering (DINO default)")
    dino_loss_weight: float = Field(1.0, ge=0)
    ibot_loss_weight: float = Field(1.0, ge=0)
    koleo_loss_weight: float = Field(0.1, ge=0, description="DINOv2 KoLeo weight on student CLS")


class DINOv2Config(DINOObjectiveConfig):
    """The DINOv2 objective: DINO (CLS) + iBOT (masked patches) + KoLeo, EMA teacher."""

    head_prototypes: int = Field(65536, ge=2, description="131072 for ViT-g")
    head_hidden_dim: int = Field(2048, ge=1)
    head_bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    ibot_separate_head: bool = Field(False, description="True for ViT-g in DINOv2")
    ibot_prototypes: int = Field(65536, ge=2)
    teacher_temp_start: float = Field(0.04, gt=0)
    teacher_temp_end: float = Field(0.07, gt=0)
    teacher_temp_warmup_epochs: float = Field(30, ge=0, description="of 100 in DINOv2")
    momentum_start: float = Field(0.992, ge=0, le=1, description="0.994 for ViT-g")
    momentum_end: float = Field(1.0, ge=0, le=1)
    mask_sample_p: float = Field(0.5, ge=0, le=1)
    mask_ratio_min: float = Field(0.1, ge=0, le=1)
    mask_ratio_max: float = Field(0.5, ge=0, le=1)
    freeze_prototypes_epochs: float = Field(1.0, ge=0, description="prototype layer frozen this long")
