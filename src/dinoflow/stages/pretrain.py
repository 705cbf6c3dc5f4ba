"""pretrain: self-supervised pretraining of a backbone on a manifest (DINOv2 / MAE / SplitMask)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class PretrainSpec(StageSpec):
    manifest_uri: str
    method: Literal["dinov2", "mae", "splitmask"] = "dinov2"
    backbone: str = Field("vit_tiny_p4_28", description="a dinoflow backbone name (dinoflow.models)")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size")
    nproc: int = Field(1, ge=1, description="processes (torchrun) on this node")
    nnodes: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every_steps: int = Field(100, ge=1)


class PretrainResult(StageResult):
    backbone_uri: str
    checkpoint_uri: str
    curves_uri: str
    steps: int
    final_loss: float


def run(spec: PretrainSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("pretrain stage: see issue 3")
