"""ingest: raw inputs (IDX pairs, image folders, tar shards, file lists) -> shards + manifests.

Unreadable inputs (truncated, corrupt, zero-sized, not images) are skipped and listed with the
reason in ``quarantine.jsonl``; they never crash the stage and never reach a shard. The readers of
each input kind live in ``dinoflow.data.ingest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)


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


@dataclass
class _Split:
    """What one split produced: its manifest rows and the shards written."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    shards: int = 0


def _encoded(payload: Any) -> tuple[bytes, str, int, int]:
    """(stored bytes, extension, width, height); raises ``BadImage`` for an unusable input."""
    import numpy as np

    from dinoflow.data.images import decode_image, encode_png, image_ext

    if isinstance(payload, np.ndarray):
        h, w = payload.shape[:2]
        return encode_png(payload), "png", int(w), int(h)
    img = decode_image(payload)
    return payload, image_ext(img), int(img.size[0]), int(img.size[1])


def _ingest_split(spec: IngestSpec, store, split: str, inputs: list[str], quarantine: list[dict]) -> _Split:
    """Decode one split's inputs into shards; unreadable ones go to ``quarantine`` with the reason."""
    from tqdm import tqdm

    from dinoflow import metrics
    from dinoflow.data.images import BadImage
    from dinoflow.data.ingest import iter_items
    from dinoflow.data.shards import ShardWriter

    out = _Split()
    items = iter_items(spec.kind, store, inputs, spec.label_names)
    with ShardWriter(store, spec.out(split), spec.samples_per_shard) as writer:
        for origin, payload, label in tqdm(items, desc=f"ingest {split}", unit="img", mininterval=2):
            if spec.limit_per_split and len(out.rows) >= spec.limit_per_split:
                break
            try:
                data, ext, w, h = _encoded(payload)
            except BadImage as e:
                quarantine.append({"split": split, "input": origin, "reason": e.reason})
                metrics.IMAGES_QUARANTINED.labels("ingest", e.reason.split(":")[0][:40]).inc()
                continue
            key = f"{len(out.rows):09d}"
            shard, member = writer.add(
                key, data, ext, {"label": label, "source": spec.source, "origin": origin}
            )
            out.rows.append(
                {
                    "key": f"{spec.source}/{split}/{key}",
                    "shard": shard,
                    "member": member,
                    "source": spec.source,
                    "label": label,
                    "width": w,
                    "height": h,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "split": split,
                }
            )
        out.shards = len(writer.close())
    if not out.rows:
        raise SpecError(
            f"split {split!r}: no readable image among its inputs ({len(quarantine)} quarantined)"
        )
    return out


def _label_counts(rows: list[dict[str, Any]], names: list[str]) -> dict[str, int]:
    return {
        (names[k] if 0 <= k < len(names) else str(k)): v
        for k, v in sorted(Counter(r["label"] for r in rows).items())
    }


def _write_quarantine(spec: IngestSpec, store, quarantine: list[dict]) -> str | None:
    if not quarantine:
        return None
    uri = spec.out("quarantine.jsonl")
    store.put_bytes(uri, "".join(json.dumps(q) + "\n" for q in quarantine).encode(), "application/x-ndjson")
    log.warning("ingest: %d input(s) quarantined, see %s", len(quarantine), uri)
    return uri


def run(spec: IngestSpec, store) -> IngestResult:
    from dinoflow import metrics
    from dinoflow.data.manifest import from_rows, write_manifest

    t0 = time.perf_counter()
    manifests, counts, label_counts = {}, {}, {}
    quarantine: list[dict] = []
    n_shards = 0
    for split, inputs in spec.splits.items():
        if not inputs:
            raise SpecError(f"split {split!r} has no inputs")
        done = _ingest_split(spec, store, split, inputs, quarantine)
        n_shards += done.shards
        uri = spec.out(split, "manifest.parquet")
        write_manifest(store, uri, from_rows(done.rows))
        manifests[split], counts[split] = uri, len(done.rows)
        label_counts[split] = _label_counts(done.rows, spec.label_names)
        metrics.IMAGES_PROCESSED.labels("ingest").inc(len(done.rows))
    q_uri = _write_quarantine(spec, store, quarantine)
    dt = time.perf_counter() - t0
    return IngestResult(
        output_uri=spec.output_uri,
        manifests=manifests,
        counts=counts,
        label_counts=label_counts,
        quarantined=len(quarantine),
        quarantine_uri=q_uri,
        shards=n_shards,
        images_per_second=round(sum(counts.values()) / max(dt, 1e-9), 1),
    )
