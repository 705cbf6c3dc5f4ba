"""What the ingest stage reads: input groups per split, found in a dataset folder or named in a
spec, and the ledger of source objects that earlier ingests read.

A dataset folder (``s3://bucket/raw/NAME`` as ``dinoflow upload`` writes it, or a local directory) is
``{root}/{split}/...``: class sub-folders label the images under them, IDX pairs
(``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]``) and tar shards carry their own labels,
and an optional ``{root}/dataset.json`` names the source and its classes (``label_names``).

The ledger is one JSON object per ingest run under a ``seen`` prefix, listing the source objects that
run read; an object counts as new while no other run's record names it (re-uploading under the same
key is not new data).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoflow.data.ingest import skipped_folder
from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore, join_uri

DATASET_JSON = "dataset.json"
KINDS = ("auto", "idx", "folder", "shards", "files")
_IDX_IMAGES = re.compile(r"images-idx[34]-ubyte")
_IDX_ANY = re.compile(r"idx\d-ubyte")


@dataclass(frozen=True)
class Group:
    """Inputs read by one reader of ``dinoflow.data.ingest``; ``label`` labels every item of a class
    folder (None: the reader's own labels, -1 when it has none)."""

    kind: str
    inputs: tuple[str, ...]
    label: int | None = None


@dataclass
class Layout:
    """A dataset folder as input groups per split."""

    splits: dict[str, list[Group]] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    source: str = ""
    lists_skipped: list[str] = field(default_factory=list)  # .txt files: lists are read only from splits


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def list_files(store: ObjectStore, root: str) -> list[str]:
    """Every file under ``root`` (an s3:// prefix or a local directory) as a path relative to it."""
    if _is_s3(root):
        prefix = root.rstrip("/") + "/"
        return [u[len(prefix) :] for u in store.list(prefix)]
    base = Path(root)
    if not base.is_dir():
        raise SpecError(f"source_uri {root} is not a directory (nor an s3:// prefix)")
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def dataset_info(store: ObjectStore, root: str) -> dict[str, Any]:
    """``{root}/dataset.json`` (source name, label_names), or {} when there is none."""
    uri = join_uri(root, DATASET_JSON) if _is_s3(root) else str(Path(root) / DATASET_JSON)
    if _is_s3(root):
        info = store.get_json(uri) if store.exists(uri) else {}
    else:
        import json

        info = json.loads(Path(uri).read_text()) if Path(uri).exists() else {}
    if not isinstance(info, dict):
        raise SpecError(f"{uri} must hold a JSON object (source, label_names)")
    return info


def _kind_of(name: str, kind: str) -> str:
    """The reader for one file: the spec's kind, or by its name when the kind is ``auto``."""
    if kind != "auto":
        return kind
    if _IDX_ANY.search(name):
        return "idx"
    if name.endswith(".tar"):
        return "shards"
    return "files"


def _idx_pairs(paths: list[str]) -> list[tuple[str, str]]:
    """(images, labels) pairs among IDX files: ``X-images-idx3-ubyte`` with ``X-labels-idx1-ubyte``."""
    have = set(paths)
    pairs = []
    for p in sorted(paths):
        if not _IDX_IMAGES.search(p):
            continue
        labels = _IDX_IMAGES.sub("labels-idx1-ubyte", p)
        if labels not in have:
            raise SpecError(f"IDX images {p} has no labels file {labels} beside it")
        pairs.append((p, labels))
    paired = {x for pair in pairs for x in pair}
    lone = [p for p in paths if p not in paired]
    if lone:
        raise SpecError(f"IDX file(s) without a pair (*-images-idx3-ubyte + *-labels-idx1-ubyte): {lone[:3]}")
    return pairs


def _groups(kind: str, paths: list[str], labels: dict[str, int | None]) -> list[Group]:
    """Input groups for one split's files; ``labels`` maps a file to its class folder's label."""
    by_kind: dict[str, list[str]] = {}
    for p in paths:
        by_kind.setdefault(_kind_of(p, kind), []).append(p)
    out: list[Group] = []
    for k, ps in by_kind.items():
        if k == "idx":
            out += [Group("idx", pair) for pair in _idx_pairs(ps)]
        elif k == "shards":
            out.append(Group("shards", tuple(ps)))
        else:  # image files, one group per class folder
            per_label: dict[int | None, list[str]] = {}
            for p in ps:
                per_label.setdefault(labels.get(p), []).append(p)
            out += [Group("files", tuple(v), lab) for lab, v in per_label.items()]
    return out


def groups_for_inputs(kind: str, inputs: list[str]) -> list[Group]:
    """The groups of a split whose inputs a spec names (local folders read as ``folder``)."""
    if kind != "auto":
        return [Group(kind, tuple(inputs))]
    dirs = [p for p in inputs if not _is_s3(p) and Path(p).is_dir()]
    files = [p for p in inputs if p not in dirs]
    return ([Group("folder", tuple(dirs))] if dirs else []) + _groups("auto", files, {})


def layout(
    store: ObjectStore,
    root: str,
    kind: str,
    label_names: list[str],
    only_splits: list[str],
    source: str | None,
) -> Layout:
    """The dataset folder ``root`` as groups per split (``only_splits``: just those)."""
    files = [
        f
        for f in list_files(store, root)
        if "/" in f
        and not Path(f).name.startswith(".")
        and not any(skipped_folder(d) for d in f.split("/")[:-1])
    ]
    info = dataset_info(store, root)
    out = Layout(source=source or str(info.get("source") or Path(root.rstrip("/")).name))
    classes = sorted({f.split("/")[1] for f in files if f.count("/") >= 2})
    names = list(label_names or info.get("label_names") or [])
    unknown = [c for c in classes if names and c not in names]
    if unknown and kind in ("auto", "folder"):
        raise SpecError(f"{root}: class folders {unknown[:5]} are not in label_names {names}")
    out.label_names = names or classes
    per_split: dict[str, list[str]] = {}
    for f in files:
        per_split.setdefault(f.split("/")[0], []).append(f)
    for split, rel in sorted(per_split.items()):
        if only_splits and split not in only_splits:
            continue
        labels: dict[str, int | None] = {}
        keep = []
        for f in rel:
            if f.endswith(".txt") and kind in ("auto", "folder"):
                out.lists_skipped.append(f)
                continue
            keep.append(f)
            parts = f.split("/")
            if kind in ("auto", "folder") and len(parts) >= 3:
                labels[f] = out.label_names.index(parts[1])
        absolute = {f: (join_uri(root, f) if _is_s3(root) else str(Path(root) / f)) for f in keep}
        groups = _groups(
            "files" if kind == "folder" else kind,
            [absolute[f] for f in keep],
            {absolute[f]: lab for f, lab in labels.items()},
        )
        if groups:
            out.splits[split] = groups
    return out


def objects(groups: list[Group]) -> list[str]:
    return [x for g in groups for x in g.inputs]


def drop_seen(groups: list[Group], seen: set[str]) -> tuple[list[Group], int]:
    """The groups without inputs read before (an IDX pair stays whole) and how many were dropped."""
    out, dropped = [], 0
    for g in groups:
        if g.kind == "idx":
            if set(g.inputs) <= seen:
                dropped += len(g.inputs)
            else:
                out.append(g)
            continue
        new = tuple(x for x in g.inputs if x not in seen)
        dropped += len(g.inputs) - len(new)
        if new:
            out.append(Group(g.kind, new, g.label))
    return out, dropped


# -- the ledger ------------------------------------------------------------------------------------
def record_key(output_uri: str) -> str:
    """The ledger entry of the ingest run writing ``output_uri`` (a rerun replaces its own entry)."""
    return hashlib.sha256(output_uri.encode()).hexdigest()[:16] + ".json"


def read_seen(store: ObjectStore, seen_uri: str, own_output_uri: str) -> set[str]:
    """Source objects recorded by every other ingest run under ``seen_uri``."""
    own = record_key(own_output_uri)
    seen: set[str] = set()
    for uri in store.list(seen_uri.rstrip("/") + "/"):
        if uri.endswith("/" + own) or not uri.endswith(".json"):
            continue
        seen.update(store.get_json(uri).get("objects", []))
    return seen


def record(store: ObjectStore, seen_uri: str, output_uri: str, source: str, read: list[str]) -> str:
    """Record the objects an ingest run read (written before its ``_SUCCESS`` marker)."""
    uri = join_uri(seen_uri, record_key(output_uri))
    store.put_json(uri, {"output_uri": output_uri, "source": source, "objects": sorted(read)})
    return uri


# -- upload ------------------------------------------------------------------------------------------
@dataclass
class Upload:
    """What ``upload_dataset`` did."""

    dataset_uri: str
    uploaded: int = 0
    already_there: int = 0
    bytes_uploaded: int = 0


def fashion_mnist_files(root: str | None = None) -> dict[str, Path]:
    """Fashion-MNIST's IDX files as a dataset folder: ``{split}/{file name}`` -> local path."""
    from dinoflow.data.idx import fashion_mnist_paths

    return {f"{split}/{p.name}": p for split, pair in fashion_mnist_paths(root).items() for p in pair}


def folder_files(root: str | Path) -> dict[str, Path]:
    """A local dataset folder's files by relative path; every one must lie in a split folder."""
    base = Path(root)
    if not base.is_dir():
        raise SpecError(f"{root} is not a directory")
    files = {str(p.relative_to(base)): p for p in sorted(base.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not Path(k).name.startswith(".")}
    loose = [k for k in files if "/" not in k and k != DATASET_JSON]
    if loose:
        raise SpecError(
            f"{root}: {loose[:3]} lie outside a split folder; lay the dataset out as "
            "{split}/{class}/{image} (e.g. train/cat/1.png)"
        )
    if not [k for k in files if "/" in k]:
        raise SpecError(f"{root} holds no files under split folders (e.g. train/cat/1.png)")
    return files


def upload_dataset(
    store: ObjectStore, files: dict[str, Path], dest: str, info: dict[str, Any] | None = None
) -> Upload:
    """Put ``files`` (relative path -> local file) under the prefix ``dest`` and ``info`` as its
    ``dataset.json`` (unless ``files`` has one). An object already there with the same size is kept;
    one with another size is a conflict, and nothing is uploaded then (nothing stored is overwritten)."""
    import json

    from dinoflow.storage.client import parse_uri

    parse_uri(dest)
    dest = dest.rstrip("/")
    payload = {k: v.read_bytes() if k == DATASET_JSON else v for k, v in files.items()}
    existing = set(store.list(dest + "/"))
    if DATASET_JSON not in payload and info and join_uri(dest, DATASET_JSON) not in existing:
        # a dataset's first upload names it; adding images later keeps what it says
        payload[DATASET_JSON] = json.dumps(info, indent=2, sort_keys=True).encode()
    report = Upload(dataset_uri=dest)
    todo = {}
    for rel, src in sorted(payload.items()):
        uri = join_uri(dest, rel)
        size = len(src) if isinstance(src, bytes) else src.stat().st_size
        if uri in existing:
            if store.stat(uri)["size"] != size:
                raise SpecError(
                    f"{uri} already holds a different object ({store.stat(uri)['size']} bytes, the local "
                    f"file has {size}); nothing was uploaded: choose another --name or remove it first"
                )
            report.already_there += 1
            continue
        todo[uri] = (src, size)
    for uri, (src, size) in todo.items():
        if isinstance(src, bytes):
            store.put_bytes(uri, src, "application/json")
        else:
            store.put_file(uri, src)
        report.uploaded += 1
        report.bytes_uploaded += size
    return report
