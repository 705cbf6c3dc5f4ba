"""dedup: near-duplicate removal and test-set decontamination (DINOv2 Sec. 3)."""

from __future__ import annotations

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class DedupSpec(StageSpec):
    manifest_uri: str
    embeddings_uri: str
    eval_manifest_uris: list[str] = Field(default_factory=list, description="sets to decontaminate against")
    eval_embeddings_uris: list[str] = Field(default_factory=list)
    k: int = Field(64, ge=1, description="neighbours per image (DINOv2: 64)")
    threshold_cos: float = Field(0.6, gt=-1, le=1, description="self-dedup edge threshold (DINOv2: 0.6)")
    decontam_threshold_cos: float = Field(0.45, gt=-1, le=1, description="eval-copy threshold (DINOv2: 0.45)")


class DedupResult(StageResult):
    manifest_uri: str = Field(..., description="kept manifest")
    embeddings_uri: str = Field(..., description="embeddings of the kept rows")
    groups_uri: str
    report_uri: str
    input_count: int
    kept_count: int


def run(spec: DedupSpec, store):  # noqa: ANN001, ANN201
    raise NotImplementedError("dedup stage: see issue 4")
