"""distill: a frozen pretrained teacher -> smaller students (DINOv2 Sec. 5)."""

from __future__ import annotations

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class DistillSpec(StageSpec):
    manifest_uri: str
    teacher_uri: str = Field(..., description="exported teacher backbone + heads checkpoint prefix")
    students: list[str] = Field(..., min_length=1, description="student backbone names")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)


class DistillResult(StageResult):
    backbone_uris: dict[str, str]
    curves_uri: str


def run(spec: DistillSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("distill stage: see issue 5")
