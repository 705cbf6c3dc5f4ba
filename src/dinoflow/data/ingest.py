"""Readers of raw ingest inputs: IDX pairs, class folders, tar shards and file lists, each yielding
``(origin, payload, label)`` items for the ingest stage (``dinoflow.stages.ingest``) to decode,
quarantine and shard.

A payload the stage cannot decode is quarantined with the reason; an input that cannot be *read*
(a missing path, a directory where a file was named, a missing object, an I/O or store error) is an
error that stops the stage, never a quarantine: the stage then leaves nothing marked finished, and a
rerun reads it again. Class folders (``folder_classes``) ignore hidden and archive-tool folders;
tar shards stream member by member (never held whole in memory), and their samples are keyed by
the basename's first dot.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dinoflow.data.idx import read_idx
from dinoflow.data.images import MAX_IMAGE_BYTES, BadImage, is_image_ext
from dinoflow.data.shards import sample_key
from dinoflow.errors import SpecError, StorageError
from dinoflow.storage.client import ObjectStore, read_local_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# One raw item: (where it came from, encoded bytes, a uint8 array or the reason it is unusable,
# label or -1)
Item = tuple[str, "bytes | np.ndarray | BadImage", int]

_MAX_META_BYTES = 1 << 20  # a sample's .json
_MAX_LIST_DEPTH = 16  # .txt lists naming .txt lists
_IMAGE_PREFERENCE = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


def _read(store: ObjectStore, path: str) -> bytes:
    """The bytes of one named input; any failure to read it is a one-line error, not an empty file."""
    if path.startswith("s3://"):
        data = store.get_bytes(path)
        if not data and store.stat(path)["size"]:
            raise StorageError(f"reading {path} returned 0 of {store.stat(path)['size']} bytes")
        return data
    return read_local_bytes(path, "input", MAX_IMAGE_BYTES, " (a folder of images is kind 'folder')")


def skipped_folder(name: str) -> bool:
    """Hidden folders and archive-tool droppings are never classes (.ipynb_checkpoints, __MACOSX)."""
    return name.startswith(".") or name in ("__MACOSX", "__pycache__")


def folder_classes(roots: Iterable[str]) -> list[str]:
    """One sorted class list over the class folders of every root (all splits): a class has the
    same label in every split, whichever splits hold it."""
    classes: set[str] = set()
    for root in roots:
        rootp = Path(root)
        if rootp.is_dir():
            classes |= {d.name for d in rootp.iterdir() if d.is_dir() and not skipped_folder(d.name)}
    return sorted(classes)


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
    """Images under class folders; labels index ``label_names`` (give it, or the class list over
    all splits from ``folder_classes``, so every split numbers classes alike)."""
    for root in inputs:
        rootp = Path(root)
        if not rootp.is_dir():
            raise SpecError(f"kind 'folder': {root} is not a directory")
        names = label_names or folder_classes(inputs)
        classes = folder_classes([root])
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise SpecError(f"folder {root} has class folders {unknown} not in label_names {names}")
        for f in sorted(rootp.rglob("*")):
            rel = f.relative_to(rootp).parts
            if any(skipped_folder(part) for part in rel[:-1]) or f.name.startswith(".") or not f.is_file():
                continue
            label = names.index(rel[0]) if len(rel) > 1 and rel[0] in names else -1
            yield str(f), _read(store, str(f)), label


def _label(meta: Any, label_names: list[str]) -> int | BadImage:
    """A sample's label from its .json: an integer (-1 = none) or a name in ``label_names``."""
    if not isinstance(meta, dict) or "label" not in meta or meta["label"] is None:
        return -1
    v = meta["label"]
    if isinstance(v, bool) or not isinstance(v, int | str):
        return BadImage(f"label {v!r} is neither an integer nor a class name")
    if isinstance(v, str):
        if v in label_names:
            return label_names.index(v)
        return BadImage(f"label {v[:40]!r} is not an integer nor one of label_names")
    if v < -1 or (label_names and v >= len(label_names)):
        return BadImage(f"label {v} is out of range for {len(label_names) or 'unnamed'} classes")
    return v


def _sample_item(shard: str, key: str, members: dict[str, bytes | BadImage], names: list[str]) -> Item:
    origin = f"{shard}#{key}"
    meta_raw = members.get("json", b"")
    if isinstance(meta_raw, BadImage):
        return origin, meta_raw, -1
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except (ValueError, UnicodeDecodeError) as e:
        return origin, BadImage(f"sample metadata is not valid JSON: {str(e)[:80]}"), -1
    label = _label(meta, names)
    if isinstance(label, BadImage):
        return origin, label, -1
    exts = [e for e in _IMAGE_PREFERENCE if e in members] + sorted(
        e for e in members if e not in _IMAGE_PREFERENCE and "." not in e and is_image_ext(e)
    )
    if not exts:
        return origin, BadImage(f"sample has no image member (members: {sorted(members)[:5]})"), label
    return origin, members[exts[0]], label


def _iter_shards(store: ObjectStore, inputs: list[str], label_names: list[str]) -> Iterator[Item]:
    """Samples of tar shards (plain or compressed), streamed: members are read one at a time and a
    sample is handed on as soon as the next key starts (WebDataset keeps a sample's members
    together); a member larger than ``MAX_IMAGE_BYTES`` is refused unread."""
    for shard in inputs:
        path = _local(store, shard)
        key: str | None = None
        members: dict[str, bytes | BadImage] = {}
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    k, ext = sample_key(m.name)
                    if key is not None and k != key:
                        yield _sample_item(shard, key, members, label_names)
                        members = {}
                    key = k
                    limit = _MAX_META_BYTES if ext == "json" else MAX_IMAGE_BYTES
                    if m.size > limit:
                        members[ext] = BadImage(f"member {m.name} too large ({m.size} bytes > {limit})")
                        continue
                    f = tar.extractfile(m)
                    members[ext] = f.read() if f else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SpecError(f"{shard} is not a readable tar shard: {str(e).splitlines()[0][:160]}") from None
        if key is not None:
            yield _sample_item(shard, key, members, label_names)


def _iter_files(store: ObjectStore, inputs: list[str], _seen: tuple[str, ...] = ()) -> Iterator[Item]:
    """Image files, and ``.txt`` lists of them (one path or s3:// URI a line; lists may name lists,
    never one that names itself)."""
    for p in inputs:
        if p.endswith(".txt"):
            if p in _seen or len(_seen) >= _MAX_LIST_DEPTH:
                chain = " -> ".join((*_seen, p))
                raise SpecError(
                    f"file lists nest in a loop or too deep ({chain}): a list cannot include itself"
                )
            try:
                text = _read(store, p).decode("utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"file list {p} is not UTF-8 text") from None
            listed = [ln.strip() for ln in text.splitlines() if ln.strip()]
            yield from _iter_files(store, listed, (*_seen, p))
            continue
        yield p, _read(store, p), -1


def iter_items(kind: str, store: ObjectStore, inputs: list[str], label_names: list[str]) -> Iterator[Item]:
    """The raw items of one split's ``inputs``, read as ``kind`` (idx, folder, shards or files)."""
    readers = {
        "idx": lambda: _iter_idx(store, inputs),
        "folder": lambda: _iter_folder(store, inputs, label_names),
        "shards": lambda: _iter_shards(store, inputs, label_names),
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
