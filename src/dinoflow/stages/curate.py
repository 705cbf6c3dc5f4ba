"""curate: retrieval of pool images similar to curated seed sets (DINOv2 Sec. 3), or hierarchical
k-means balanced sampling (the ssl-data-curation method used for DINOv3's data)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class CurateSpec(StageSpec):
    manifest_uri: str
    embeddings_uri: str
    seed_manifest_uris: list[str] = Field(default_factory=list)
    seed_embeddings_uris: list[str] = Field(default_factory=list)
    strategy: Literal["retrieval", "cluster", "hierarchical-kmeans"] = "retrieval"
    target_size: int = Field(..., ge=1, description="images in the curated manifest")


class CurateResult(StageResult):
    manifest_uri: str
    embeddings_uri: str | None = None
    report_uri: str
    count: int
    per_source: dict[str, int] = Field(default_factory=dict)


def run(spec: CurateSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("curate stage: see issue 4")
