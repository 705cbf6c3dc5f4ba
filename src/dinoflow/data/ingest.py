"""The ingest stage's work: raw inputs -> shards + one manifest per split + a quarantine list.

Unreadable inputs (truncated, corrupt, zero-sized, not images) are skipped and listed with the
reason; they never crash the stage and never reach a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dinoflow import metrics
from dinoflow.data.idx import read_idx
from dinoflow.data.images import BadImage, decode_image, encode_png, image_ext
from dinoflow.data.manifest import from_rows, write_manifest
from dinoflow.data.shards import ShardWriter
from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# One raw item: (where it came from, encoded bytes or a uint8 array, label or -1)
Item = tuple[str, "bytes | np.ndarray", int]


def _read(store: ObjectStore, path: str) -> bytes:
    if path.startswith("s3://"):
        return store.get_bytes(path)
    return Path(path).read_bytes()


def _local(store: ObjectStore, path: str) -> Path:
    p = store.cached(path) if path.startswith("s3://") else Path(path)
    if not p.exists():
        raise SpecError(f"input {path} does not exist")
    return p


def _iter_idx(store: ObjectStore, inputs: list[str]) -> Iterator[Item]:
    if len(inputs) != 2:
        raise SpecError(f"kind 'idx' takes [images, labels] per split, got {len(inputs)} path(s)")
    images = read_idx(_local(store, inputs[0]))
    labels = read_idx(_local(store, inputs[1]))
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise SpecError(
            f"IDX pair mismatch: images {images.shape} vs labels {labels.shape} ({inputs[0]}, {inputs[1]})"
        )
    for i in range(len(images)):
        yield f"{inputs[0]}#{i}", images[i], int(labels[i])


def _iter_folder(store: ObjectStore, inputs: list[str], label_names: list[str]) -> Iterator[Item]:
    for root in inputs:
        rootp = Path(root)
        if not rootp.is_dir():
            raise SpecError(f"kind 'folder': {root} is not a directory")
        classes = sorted(d.name for d in rootp.iterdir() if d.is_dir())
        names = label_names or classes
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise SpecError(f"folder {root} has class folders {unknown} not in label_names {names}")
        for f in sorted(rootp.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                rel = f.relative_to(rootp).parts
                label = names.index(rel[0]) if len(rel) > 1 and rel[0] in names else -1
                yield str(f), f.read_bytes(), label


def _iter_shards(store: ObjectStore, inputs: list[str]) -> Iterator[Item]:
    for shard in inputs:
        path = _local(store, shard)
        try:
            with tarfile.open(path, mode="r:*") as tar:
                samples: dict[str, dict[str, bytes]] = {}
                for m in tar:
                    if m.isfile():
                        key, _, ext = m.name.partition(".")
                        f = tar.extractfile(m)
                        samples.setdefault(key, {})[ext.lower()] = f.read() if f else b""
        except tarfile.TarError as e:
            raise SpecError(f"{shard} is not a readable tar shard: {e}") from None
        for key, sample in samples.items():
            meta = json.loads(sample.get("json", b"{}") or b"{}")
            img = next((sample[e] for e in ("png", "jpg", "jpeg", "webp", "bmp") if e in sample), None)
            label = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
            yield f"{shard}#{key}", (img if img is not None else b""), label


def _iter_files(store: ObjectStore, inputs: list[str]) -> Iterator[Item]:
    for p in inputs:
        if p.endswith(".txt"):
            listed = [ln.strip() for ln in _read(store, p).decode().splitlines() if ln.strip()]
            yield from _iter_files(store, listed)
            continue
        try:
            data = _read(store, p)
        except (OSError, Exception) as e:  # a listed file that vanished is quarantined, not fatal
            if isinstance(e, SpecError):
                raise
            yield p, b"", -1
            continue
        yield p, data, -1


def ingest(spec, store: ObjectStore):  # IngestSpec -> IngestResult
    from dinoflow.stages.ingest import IngestResult

    t0 = time.perf_counter()
    manifests, counts, label_counts = {}, {}, {}
    quarantine: list[dict] = []
    n_shards = 0
    for split, inputs in spec.splits.items():
        if not inputs:
            raise SpecError(f"split {split!r} has no inputs")
        items = {
            "idx": lambda inputs=inputs: _iter_idx(store, inputs),
            "folder": lambda inputs=inputs: _iter_folder(store, inputs, spec.label_names),
            "shards": lambda inputs=inputs: _iter_shards(store, inputs),
            "files": lambda inputs=inputs: _iter_files(store, inputs),
        }[spec.kind]()
        rows = []
        prefix = spec.out(split)
        with ShardWriter(store, prefix, spec.samples_per_shard) as writer:
            for origin, payload, label in tqdm(items, desc=f"ingest {split}", unit="img", mininterval=2):
                if spec.limit_per_split and len(rows) >= spec.limit_per_split:
                    break
                if isinstance(payload, np.ndarray):
                    data, ext, (h, w) = encode_png(payload), "png", payload.shape[:2]
                else:
                    try:
                        img = decode_image(payload)
                    except BadImage as e:
                        quarantine.append({"split": split, "input": origin, "reason": e.reason})
                        metrics.IMAGES_QUARANTINED.labels("ingest", e.reason.split(":")[0][:40]).inc()
                        continue
                    data, ext, (w, h) = payload, image_ext(img), img.size
                idx = len(rows)
                key = f"{idx:09d}"
                shard, member = writer.add(
                    key, data, ext, {"label": label, "source": spec.source, "origin": origin}
                )
                rows.append(
                    {
                        "key": f"{spec.source}/{split}/{key}",
                        "shard": shard,
                        "member": member,
                        "source": spec.source,
                        "label": label,
                        "width": int(w),
                        "height": int(h),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "split": split,
                    }
                )
            n_shards += len(writer.close())
        if not rows:
            raise SpecError(
                f"split {split!r}: no readable image among its inputs ({len(quarantine)} quarantined)"
            )
        uri = spec.out(split, "manifest.parquet")
        write_manifest(store, uri, from_rows(rows))
        manifests[split], counts[split] = uri, len(rows)
        names = spec.label_names
        label_counts[split] = {
            (names[k] if 0 <= k < len(names) else str(k)): v
            for k, v in sorted(Counter(r["label"] for r in rows).items())
        }
        metrics.IMAGES_PROCESSED.labels("ingest").inc(len(rows))
    q_uri = None
    if quarantine:
        q_uri = spec.out("quarantine.jsonl")
        store.put_bytes(
            q_uri, "".join(json.dumps(q) + "\n" for q in quarantine).encode(), "application/x-ndjson"
        )
        log.warning("ingest: %d input(s) quarantined, see %s", len(quarantine), q_uri)
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


def fashion_mnist_spec(output_uri: str, root: str | None = None, limit_per_split: int | None = None) -> dict:
    """The ingest spec for the Debian package's Fashion-MNIST (train + test, labelled)."""
    from dinoflow.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_paths

    paths = fashion_mnist_paths(root)
    return {
        "output_uri": output_uri,
        "kind": "idx",
        "source": "fashion-mnist",
        "splits": {s: [str(p[0]), str(p[1])] for s, p in paths.items()},
        "label_names": FASHION_MNIST_CLASSES,
        "samples_per_shard": 10000,
        "limit_per_split": limit_per_split,
    }
