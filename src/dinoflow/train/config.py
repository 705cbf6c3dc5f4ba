"""Training configuration as data (pydantic, no torch import), shared by the pretrain and distill
stages, the torchrun worker and the presets. Defaults follow DINOv2's ``ssl_default_config.yaml``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dinoflow.methods.config import CropsConfig, DINOv2Config
from dinoflow.methods.distill_config import DistillConfig
from dinoflow.methods.mim_config import MAEConfig, SplitMaskConfig
from dinoflow.methods.sscd_config import SSCDConfig


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr_per_1024: float = Field(0.004, gt=0, description="peak LR = lr_per_1024 * sqrt(batch/1024) (DINOv2)")
    min_lr: float = Field(1e-6, ge=0, description="final LR of the cosine (DINOv2 1e-6)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up (DINOv2: 10 epochs)")
    weight_decay_start: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    layer_decay: float = Field(0.9, gt=0, le=1, description="layer-wise LR decay")
    patch_embed_lr_mult: float = Field(0.2, gt=0)
    clip_grad: float = Field(3.0, ge=0, description="0 disables clipping")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)


class DataConfig(BaseModel):
    """How training input streams (``dinoflow.data.stream``)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(2, ge=0, description="DataLoader workers per process (0: decode in the process)")
    streams: int | None = Field(
        None,
        ge=1,
        description="logical input streams the global batch is drawn from; a multiple of the processes, "
        "at most batch_size; default batch_size. Changing it changes the sample order",
    )
    shuffle_buffer: int = Field(1000, ge=1, description="rows in each stream's shuffle buffer")
    prefetch_batches: int = Field(2, ge=1, description="chunks each worker prepares ahead")


class TrainConfig(BaseModel):
    """Everything the trainer needs besides the data."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: Literal["dinov2", "mae", "splitmask", "sscd", "distill"] = "dinov2"
    backbone: str = Field("vit_tiny_p4_28", description="a dinoflow backbone name (dinoflow.models)")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="stochastic depth (DINOv2 0.3-0.4 for big models)"
    )
    dinov2: DINOv2Config = Field(default_factory=DINOv2Config)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    mae: MAEConfig = Field(default_factory=MAEConfig, description="used when method == 'mae'")
    splitmask: SplitMaskConfig = Field(
        default_factory=SplitMaskConfig, description="used when method == 'splitmask'"
    )
    sscd: SSCDConfig = Field(
        default_factory=SSCDConfig, description="used when method == 'sscd' (a copy descriptor)"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    steps: int | None = Field(100, ge=1, description="optimizer steps (or give epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the data; overrides steps when set")
    batch_size: int = Field(64, ge=1, description="global batch size (all processes)")
    seed: int = 0
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="bf16 autocast (CUDA, or a CPU with bf16 matrix units: AMX); auto: bf16 where the "
        "device has them, else fp32",
    )
    fp32_heads: bool = Field(
        False,
        description="under bf16 autocast, run the DINO/iBOT heads (MLP, prototypes) in float32: bf16's "
        "8-bit mantissa blurs the teacher's sharp (temperature 0.04) targets (README, bf16 on the CPU)",
    )
    compile: bool = Field(False, description="torch.compile the backbone blocks")
    compile_heads: bool = Field(
        False, description="also torch.compile the DINO heads and the loss modules (fused softmax terms)"
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each ViT block's activations in the backward (less memory, ~1/3 more "
        "backbone compute): ViT-g/14 on one 80 GB GPU",
    )
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    checkpoint_every_steps: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    log_every_steps: int = Field(10, ge=1)
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve /metrics from rank 0")
    init_backbone_uri: str | None = Field(
        None, description="start the student/teacher from an exported backbone"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        return self

    def total_steps(self, n_images: int) -> int:
        spe = max(1, n_images // self.batch_size)
        return int(round(self.epochs * spe)) if self.epochs is not None else int(self.steps or 1)

    def peak_lr(self) -> float:
        return self.optim.lr_per_1024 * (self.batch_size / 1024) ** 0.5  # DINOv2 sqrt scaling


class DistillTrainConfig(TrainConfig):
    """Distillation (DINOv2 Sec. 5): the training fields plus the frozen teacher and the students.
    ``backbone`` is set to the first student; crops default to the teacher's image size."""

    method: Literal["distill"] = "distill"  # type: ignore[assignment]
    backbone: str = Field("", description="set from students[0]; give the students instead")
    teacher_uri: str = Field(
        ...,
        description="an exported teacher backbone prefix with heads.safetensors (the dinov2 pretrain stage's)",
    )
    students: list[str] = Field(
        ..., min_length=1, description="student backbone names (dinoflow.models), several welcome (DINOv3)"
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    crops: CropsConfig | None = Field(  # type: ignore[assignment]
        None,
        description="multi-crop; default: global crops at the teacher's image size, local crops at 3/7 of it "
        "(DINOv2: 224 -> 96/98), other values DINOv2's",
    )

    @field_validator("students")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"student names repeat: {v}")
        return v

    @model_validator(mode="after")
    def _first_student(self) -> DistillTrainConfig:
        if self.backbone and self.backbone != self.students[0]:
            raise ValueError("distillation trains the backbones listed in 'students'; leave 'backbone' unset")
        self.backbone = self.students[0]
        return self
