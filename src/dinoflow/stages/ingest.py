"""ingest: raw inputs (IDX pairs, image folders, tar shards, file lists) -> shards + manifests.

Unreadable inputs (truncated, corrupt, zero-sized, not images) are skipped and listed with the
reason in ``quarantine.jsonl``; they never crash the stage and never reach a shard. The readers of
each input kind live in ``dinoflow.data.ingest``.

Inputs are named per split (``splits``) or found under one dataset folder (``source_uri``, what
``dinoflow upload`` writes: ``{source_uri}/{split}/...``, class sub-folders label images, an optional
``dataset.json`` names the source and its classes). With ``seen_uri`` every run records the source
objects it read there; ``only_new`` then skips the objects earlier runs recorded, which is how a
scheduled retrain ingests only what is new under its source prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec, segment_problem

log = logging.getLogger(__name__)


class IngestSpec(StageSpec):
    """Read raw images into WebDataset-style shards with one Parquet manifest per split.

    Output layout: ``{output_uri}/{split}/shard-000000.tar``, ``{output_uri}/{split}/manifest.parquet``,
    ``{output_uri}/quarantine.jsonl`` (inputs skipped, with the reason) and ``_SUCCESS``.
    """

    kind: Literal["auto", "idx", "folder", "shards", "files"] = Field(
        "auto",
        description="idx: [images.gz, labels.gz] per split; folder: one dir per split (class "
        "sub-folders become labels); shards: tar files; files: image files or .txt lists of them; "
        "auto: by each input's name (IDX pairs, .tar shards, folders, else image files)",
    )
    source_uri: str | None = Field(
        None,
        description="a dataset folder (s3:// prefix or local directory) laid out as {split}/...; "
        "replaces `splits` (what `dinoflow upload` writes)",
    )
    splits: dict[str, list[str]] = Field(
        default_factory=dict,
        validate_default=True,
        description="split name -> input paths (local or s3://) for that split; or give source_uri",
    )
    only_splits: list[str] = Field(default_factory=list, description="source_uri: ingest only these splits")
    source: str | None = Field(
        None,
        min_length=1,
        description="name recorded in the manifest's source column (default: dataset.json's, or the "
        "source folder's name)",
    )
    label_names: list[str] = Field(default_factory=list, description="class names, index = label")
    samples_per_shard: int = Field(5000, ge=1, le=1_000_000)
    limit_per_split: int | None = Field(None, ge=1, description="ingest at most this many per split")
    seen_uri: str | None = Field(
        None, description="s3:// prefix of the ledger: each run records the source objects it read there"
    )
    only_new: bool = Field(
        False, description="skip source objects that other runs recorded under seen_uri (a retrain)"
    )

    @field_validator("splits")
    @classmethod
    def _inputs(cls, v: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        if bool(v) == bool(info.data.get("source_uri")):
            raise ValueError("give the input paths per split, or a source_uri (not both)")
        for split in v:  # each split is a folder of the output: "" or "train/" would collide
            problem = segment_problem(split, "split")
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _ledger(self) -> IngestSpec:
        if self.only_new and not self.seen_uri:
            raise ValueError("only_new needs seen_uri (where earlier runs recorded what they read)")
        if self.splits and self.source is None:
            raise ValueError("source: name the source of these inputs")
        return self


class IngestResult(StageResult):
    manifests: dict[str, str] = Field(..., description="split -> manifest URI")
    counts: dict[str, int] = Field(..., description="split -> images stored")
    label_counts: dict[str, dict[str, int]] = Field(default_factory=dict, description="split -> label -> n")
    quarantined: int = Field(0, description="inputs skipped as unreadable (see quarantine_uri)")
    quarantine_uri: str | None = None
    shards: int = 0
    images_per_second: float = 0.0
    skipped_seen: int = Field(0, description="source objects skipped as read by earlier runs (only_new)")
    seen_record_uri: str | None = Field(None, description="the ledger entry of this run (seen_uri)")


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


@dataclass
class _Plan:
    """What this run reads: input groups per split, the class names and the source's name."""

    splits: dict[str, list[Any]]
    label_names: list[str]
    source: str
    skipped_seen: int = 0


def plan(spec: IngestSpec, store) -> _Plan:
    """The inputs of every split (listed under ``source_uri``, or as the spec names them), without
    those that other runs recorded in the ledger when ``only_new``."""
    from dinoflow.data import sources
    from dinoflow.data.ingest import folder_classes

    if spec.source_uri:
        found = sources.layout(
            store, spec.source_uri, spec.kind, spec.label_names, spec.only_splits, spec.source
        )
        if found.lists_skipped:
            log.warning("ingest: .txt files under %s skipped: %s", spec.source_uri, found.lists_skipped[:5])
        if not found.splits and not spec.only_new:
            raise SpecError(
                f"source_uri {spec.source_uri} holds no input files under {{split}}/ folders "
                "(upload a dataset there with `dinoflow upload`)"
            )
        out = _Plan(found.splits, found.label_names, found.source)
    else:
        for split, inputs in spec.splits.items():
            if not inputs:
                raise SpecError(f"split {split!r} has no inputs")
        groups = {s: sources.groups_for_inputs(spec.kind, i) for s, i in spec.splits.items()}
        roots = [x for gs in groups.values() for g in gs if g.kind == "folder" for x in g.inputs]
        # one class list over every split's class folders: a class has one label in all splits
        out = _Plan(groups, list(spec.label_names) or folder_classes(roots), spec.source or "")
    if spec.only_new and spec.seen_uri:
        seen = sources.read_seen(store, spec.seen_uri, spec.output_uri)
        kept = {}
        for split, groups in out.splits.items():
            new, dropped = sources.drop_seen(groups, seen)
            out.skipped_seen += dropped
            if new:
                kept[split] = new
        out.splits = kept
    return out


def _items(store, groups: list[Any], label_names: list[str]):
    """The raw items of a split's groups; a class folder's label replaces the reader's."""
    from dinoflow.data.ingest import iter_items

    for g in groups:
        for origin, payload, label in iter_items(g.kind, store, list(g.inputs), label_names):
            yield origin, payload, (label if g.label is None else g.label)


def _ingest_split(spec: IngestSpec, store, split: str, work: _Plan, quarantine: list[dict]) -> _Split:
    """Decode one split's inputs into shards; unreadable ones go to ``quarantine`` with the reason."""
    from tqdm import tqdm

    from dinoflow import metrics
    from dinoflow.data.images import BadImage
    from dinoflow.data.shards import ShardWriter
    from dinoflow.data.sources import record_key as sources_key

    out = _Split()
    source = work.source
    # a dataset that grows run by run (seen_uri): keys carry this run's ledger entry, so they stay
    # unique when the curated sets of several runs are merged
    tag = sources_key(spec.output_uri)[:8] + "-" if spec.seen_uri else ""
    items = _items(store, work.splits[split], work.label_names)
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
            key = f"{tag}{len(out.rows):09d}"
            shard, member = writer.add(key, data, ext, {"label": label, "source": source, "origin": origin})
            out.rows.append(
                {
                    "key": f"{source}/{split}/{key}",
                    "shard": shard,
                    "member": member,
                    "source": source,
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
    from dinoflow.data import sources
    from dinoflow.data.manifest import from_rows, write_manifest

    t0 = time.perf_counter()
    work = plan(spec, store)
    manifests, counts, label_counts = {}, {}, {}
    quarantine: list[dict] = []
    n_shards = 0
    for split in work.splits:
        done = _ingest_split(spec, store, split, work, quarantine)
        n_shards += done.shards
        uri = spec.out(split, "manifest.parquet")
        write_manifest(store, uri, from_rows(done.rows))
        manifests[split], counts[split] = uri, len(done.rows)
        label_counts[split] = _label_counts(done.rows, work.label_names)
        metrics.IMAGES_PROCESSED.labels("ingest").inc(len(done.rows))
    q_uri = _write_quarantine(spec, store, quarantine)
    record = None
    read = [x for groups in work.splits.values() for x in sources.objects(groups)]
    if spec.seen_uri and read:
        record = sources.record(store, spec.seen_uri, spec.output_uri, work.source, read)
    if not work.splits:
        log.warning(
            "ingest: nothing new under %s (%d object(s), all read by earlier runs): nothing to ingest",
            spec.source_uri or "the inputs",
            work.skipped_seen,
        )
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
        skipped_seen=work.skipped_seen,
        seen_record_uri=record,
    )
