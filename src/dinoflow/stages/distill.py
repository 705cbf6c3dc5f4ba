"""distill: a frozen pretrained teacher -> smaller students (DINOv2 Sec. 5), on the shared trainer.

Writes under ``output_uri``: the trainer's checkpoints and ``curves.jsonl``, ``backbone/`` (the first
student's EMA, the trainer's default export) and ``students/{name}/`` for every student's EMA, each
in the shared export format (``backbone.safetensors`` + ``backbone.json``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from dinoflow.methods.config import CropsConfig
from dinoflow.methods.distill_config import DistillConfig
from dinoflow.stages.base import StageResult, StageSpec
from dinoflow.train.config import OptimConfig


class DistillSpec(StageSpec):
    manifest_uri: str = Field(..., description="images to distill on (labels unused)")
    teacher_uri: str = Field(
        ...,
        description="an exported teacher backbone prefix with heads.safetensors (the dinov2 pretrain stage's)",
    )
    students: list[str] = Field(
        ..., min_length=1, description="student backbone names (dinoflow.models), several welcome (DINOv3)"
    )
    steps: int | None = Field(100, ge=1, description="optimizer steps (or give epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the data; overrides steps when set")
    batch_size: int = Field(64, ge=1, description="global batch size")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    crops: CropsConfig | None = Field(
        None,
        description="multi-crop; default: global crops at the teacher's image size, local crops at 3/7 of it "
        "(DINOv2: 224 -> 96/98), other values DINOv2's",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="DINOv2 optimizer recipe")
    image_size_px: int | None = Field(None, ge=4, description="resize images on load (default: as stored)")
    max_images: int | None = Field(None, ge=1, description="seeded random subset of the manifest")
    precision: str = Field("fp32", pattern="^(fp32|bf16)$")
    checkpoint_every_steps: int = Field(100, ge=1)
    seed: int = 0

    @field_validator("students")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"student names repeat: {v}")
        return v

    @model_validator(mode="after")
    def _steps(self) -> DistillSpec:
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        return self


class DistillResult(StageResult):
    backbone_uris: dict[str, str] = Field(..., description="student name -> its EMA backbone prefix")
    curves_uri: str
    checkpoint_uri: str | None = None
    teacher_uri: str
    steps: int
    final_loss: float


def default_crops(img_size: int, patch: int) -> CropsConfig:
    """Global crops at the image size; local crops at 3/7 of it rounded to the patch (224 -> 96 / 98)."""
    local = max(patch, round(img_size * 3 / 7 / patch) * patch)
    return CropsConfig(global_crop_px=img_size, local_crop_px=local)


def build(spec: DistillSpec, store: Any) -> tuple[Any, Any, CropsConfig]:
    """(method factory, TrainConfig, crops), after every check that needs no training."""
    from safetensors.torch import load

    from dinoflow.errors import SpecError
    from dinoflow.methods.distill import Distill
    from dinoflow.models import create_backbone, get_entry, load_backbone
    from dinoflow.storage.client import join_uri
    from dinoflow.train.config import TrainConfig

    heads_uri = join_uri(spec.teacher_uri, "heads.safetensors")
    teacher = load_backbone(store, spec.teacher_uri)
    if not store.exists(heads_uri):
        raise SpecError(
            f"no teacher heads at {heads_uri}: distillation needs a backbone exported by the dinov2 pretrain "
            "stage (it saves the DINO/iBOT heads next to the backbone)"
        )
    heads = load(store.get_bytes(heads_uri))
    for s in spec.students:
        get_entry(s)  # unknown names fail here, with the list of known ones
    crops = spec.crops or default_crops(teacher.img_size, teacher.patch_size)
    cfg = TrainConfig(
        method="distill",
        backbone=spec.students[0],
        drop_path_rate=0.0,  # DINOv2 distillation: no stochastic depth in the student
        crops=crops,
        optim=spec.optim,
        steps=spec.steps,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seed=spec.seed,
        precision=spec.precision,
        checkpoint_every_steps=spec.checkpoint_every_steps,
    )

    def make() -> Distill:
        t = load_backbone(store, spec.teacher_uri)
        students = {s: create_backbone(s, drop_path_rate=0.0) for s in spec.students}
        return Distill(t, heads, students, spec.distill, crops)

    first = [make()]  # validates every teacher/student pair now, before data is loaded

    def factory() -> Distill:
        return first.pop() if first else make()  # the trainer gets the checked instance first

    return factory, cfg, crops


def run(spec: DistillSpec, store: Any) -> DistillResult:
    import numpy as np
    import torch

    from dinoflow.data.dataset import load_images
    from dinoflow.data.manifest import read_manifest
    from dinoflow.models import export_backbone
    from dinoflow.storage.client import join_uri
    from dinoflow.train.trainer import train

    make, cfg, _ = build(spec, store)
    table = read_manifest(store, spec.manifest_uri)
    if spec.max_images is not None and table.num_rows > spec.max_images:
        idx = np.sort(np.random.default_rng(spec.seed).choice(table.num_rows, spec.max_images, replace=False))
        table = table.take(idx)
    in_chans = store.get_json(join_uri(spec.teacher_uri, "backbone.json"))["in_chans"]
    images, _ = load_images(store, table, channels=in_chans, size_px=spec.image_size_px)
    torch.manual_seed(spec.seed)
    out = train(cfg, images, store, spec.output_uri, progress=True, method_factory=make)
    method = out.method
    uris: dict[str, str] = {}
    for name, ema in method.export_students().items():
        uri = join_uri(spec.output_uri, "students", name)
        export_backbone(
            store, uri, ema, {"method": "distill", "teacher_uri": spec.teacher_uri, "steps": out.steps}
        )
        uris[name] = uri
    return DistillResult(
        output_uri=spec.output_uri,
        backbone_uris=uris,
        curves_uri=out.curves_uri or join_uri(spec.output_uri, "curves.jsonl"),
        checkpoint_uri=out.checkpoint_uri,
        teacher_uri=spec.teacher_uri,
        steps=out.steps,
        final_loss=out.final_loss,
    )
