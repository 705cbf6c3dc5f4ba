"""ingest: raw inputs (IDX pairs, image folders, tar shards, file lists) -> shards + manifests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dinoflow.stages.base import StageResult, StageSpec


class IngestSpec(StageSpec):
    """Read raw images into WebDataset-style shards with one Parquet manifest per split.

    Output layout: ``{output_uri}/{split}/shard-000000.tar``, ``{output_uri}/{split}/manifest.parquet``,
    ``{output_uri}/quarantine.jsonl`` (inputs skipped, with the reason) and ``_SUCCESS``.
    """

    kind: Literal["idx", "folder", "shards", "files"] = Field(
        ...,
        description="idx: [images.gz, labels.gz] per split; folder: one dir per split (class "
        "sub-folders become labels); shards: tar files; files: image files or .txt lists of them",
    )
    splits: dict[str, list[str]] = Field(
        ..., min_length=1, description="split name -> input paths (local or s3://) for that split"
    )
    source: str = Field(..., min_length=1, description="name recorded in the manifest's source column")
    label_names: list[str] = Field(default_factory=list, description="class names, index = label")
    samples_per_shard: int = Field(5000, ge=1, le=1_000_000)
    limit_per_split: int | None = Field(None, ge=1, description="ingest at most this many per split")


class IngestResult(StageResult):
    manifests: dict[str, str] = Field(..., description="split -> manifest URI")
    counts: dict[str, int] = Field(..., description="split -> images stored")
    label_counts: dict[str, dict[str, int]] = Field(default_factory=dict, description="split -> label -> n")
    quarantined: int = Field(0, description="inputs skipped as unreadable (see quarantine_uri)")
    quarantine_uri: str | None = None
    shards: int = 0
    images_per_second: float = 0.0


def run(spec: IngestSpec, store):
    from dinoflow.data.ingest import ingest

    return ingest(spec, store)
