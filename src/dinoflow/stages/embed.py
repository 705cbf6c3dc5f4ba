"""embed: a manifest + a backbone checkpoint -> L2-normalised float16 embeddings aligned with it."""

from __future__ import annotations

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class EmbedSpec(StageSpec):
    manifest_uri: str = Field(..., description="manifest to embed (s3://.../manifest.parquet)")
    backbone_uri: str | None = Field(
        None, description="exported backbone prefix (backbone.json + backbone.safetensors); when "
        "unset, a short bootstrap pretrain on a sample of the pool provides one (DESIGN.md)"
    )
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=0)
    image_px: int | None = Field(None, ge=8, description="resize side; default: the backbone's size")
    features: str = Field("cls", pattern="^(cls|cls+patch)$", description="cls, or CLS ++ mean-pooled patches")
    device: str = Field("auto", description="auto | cpu | cuda")


class EmbedResult(StageResult):
    embeddings_uri: str = Field(..., description="prefix of row-aligned float16 .npy shards")
    manifest_uri: str
    backbone_uri: str
    dim: int
    count: int
    images_per_second: float = 0.0


def run(spec: EmbedSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("embed stage: see issue 4")
