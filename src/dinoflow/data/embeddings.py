"""Embeddings beside a manifest: float16 ``.npy`` shards, row-aligned with it (the data plane).

Layout under a prefix: ``emb-000000.npy`` ... (rows in manifest order, ``rows_per_shard`` each),
``phash.npy`` (uint64 [N, 2]: perceptual hash and mirror hash per row) and ``embeddings.json``
(count, dim, shards, features, the backbone and manifest they came from), written last.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore, join_uri

META = "embeddings.json"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_embeddings(
    store: ObjectStore,
    prefix: str,
    emb: np.ndarray,
    *,
    phash: np.ndarray | None = None,
    rows_per_shard: int = 262_144,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got {emb.shape}")
    shards = []
    for i, s in enumerate(range(0, max(len(emb), 1), rows_per_shard)):
        name = f"emb-{i:06d}.npy"
        store.put_bytes(join_uri(prefix, name), _npy_bytes(emb[s : s + rows_per_shard].astype(np.float16)))
        shards.append(name)
    if phash is not None:
        if len(phash) != len(emb):
            raise ValueError(f"phash rows {len(phash)} != embedding rows {len(emb)}")
        store.put_bytes(join_uri(prefix, "phash.npy"), _npy_bytes(np.asarray(phash, np.uint64)))
    info = {
        "count": int(len(emb)),
        "dim": int(emb.shape[1]),
        "dtype": "float16",
        "shards": shards,
        "rows_per_shard": rows_per_shard,
        "has_phash": phash is not None,
        **(meta or {}),
    }
    store.put_json(join_uri(prefix, META), info)
    return info


def read_meta(store: ObjectStore, prefix: str) -> dict[str, Any]:
    uri = join_uri(prefix, META)
    if not store.exists(uri):
        raise SpecError(f"no embeddings at {prefix} ({uri} is missing): run the embed stage first")
    return store.get_json(uri)


def read_embeddings(
    store: ObjectStore, prefix: str, dtype: Any = np.float32
) -> tuple[np.ndarray, dict[str, Any]]:
    meta = read_meta(store, prefix)
    parts = [_npy_load(store.get_bytes(join_uri(prefix, s))) for s in meta["shards"]]
    emb = np.concatenate(parts).astype(dtype) if parts else np.zeros((0, meta["dim"]), dtype)
    if len(emb) != meta["count"]:
        raise SpecError(f"embeddings at {prefix} hold {len(emb)} rows, their metadata says {meta['count']}")
    return emb, meta


def read_phash(store: ObjectStore, prefix: str) -> np.ndarray | None:
    uri = join_uri(prefix, "phash.npy")
    return _npy_load(store.get_bytes(uri)) if store.exists(uri) else None
