"""Readers of raw ingest inputs: IDX pairs, class folders, tar shards and file lists, each yielding
``(origin, payload, label)`` items for the ingest stage (``dinoflow.stages.ingest``) to decode,
quarantine and shard.

A listed file that has vanished yields an empty payload (quarantined downstream), never a crash.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dinoflow.data.idx import read_idx
from dinoflow.errors import SpecError, StorageError
from dinoflow.storage.client import ObjectStore

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
        except OSError:  # a listed local file that vanished or cannot be read: quarantined
            data = b""
        except StorageError:  # a listed object that is missing is quarantined; an unreachable store is fatal
            if store.exists(p):
                raise
            data = b""
        yield p, data, -1


def iter_items(kind: str, store: ObjectStore, inputs: list[str], label_names: list[str]) -> Iterator[Item]:
    """The raw items of one split's ``inputs``, read as ``kind`` (idx, folder, shards or files)."""
    readers = {
        "idx": lambda: _iter_idx(store, inputs),
        "folder": lambda: _iter_folder(store, inputs, label_names),
        "shards": lambda: _iter_shards(store, inputs),
        "files": lambda: _iter_files(store, inputs),
    }
    if kind not in readers:
        raise SpecError(f"unknown input kind {kind!r}; choose one of: {', '.join(readers)}")
    return readers[kind]()


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
