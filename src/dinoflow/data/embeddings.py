"""Embeddings beside a manifest: float16 ``.npy`` shards, row-aligned with it (the data plane).

Layout under a prefix: ``emb-*.npy`` shards (rows in manifest order), perceptual hashes (uint64
[N, 2]: the hash and the mirror's hash per row) as ``phash.npy`` or ``phash-*.npy`` shards, and
``embeddings.json`` (count, dim, the shards in row order with their row counts, features, the
backbone and manifest they came from), written last: a prefix without it holds no embeddings.

Several writers can fill one prefix side by side: each part of a fanned-out embed writes its own
shards (``write_part``), and one collect step lists them all in ``embeddings.json``
(``write_index``). Readers stream shard by shard (``EmbeddingReader``), so a task reads the rows
it needs without holding the whole pool.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore, join_uri

META = "embeddings.json"
DEFAULT_ROWS_PER_SHARD = 262_144


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def put_npy(store: ObjectStore, uri: str, a: np.ndarray) -> None:
    store.put_bytes(uri, npy_bytes(np.ascontiguousarray(a)))


def get_npy(store: ObjectStore, uri: str) -> np.ndarray:
    return npy_load(store.get_bytes(uri))


class EmbeddingWriter:
    """Rows appended in order (``add``), written as shards of ``rows_per_shard`` rows named
    ``emb{name}-NNNNNN.npy`` (with ``phash{name}-NNNNNN.npy`` beside them when ``hashes``: every block
    then comes with its rows' perceptual hashes) as soon as each is full: memory holds at most one shard. ``close()`` returns the listing for
    :func:`write_index` (no ``embeddings.json`` is written here)."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        dim: int,
        *,
        hashes: bool = False,
        name: str = "",
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    ):
        self.store, self.prefix, self.dim, self.name, self.per = store, prefix, int(dim), name, rows_per_shard
        self.hashes = hashes
        self.listing: dict[str, Any] = {"shards": [], "shard_rows": [], "dim": self.dim}
        if hashes:
            self.listing["phash_shards"] = []
        self._emb: list[np.ndarray] = []
        self._hash: list[np.ndarray] = []
        self._held = 0

    def add(self, emb: np.ndarray, phash: np.ndarray | None = None) -> None:
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {emb.shape}")
        if (phash is not None) != self.hashes or (phash is not None and len(phash) != len(emb)):
            raise ValueError(
                "each block's rows need their hashes" if self.hashes else "this writer takes no hashes"
            )
        self._emb.append(emb.astype(np.float16))
        if phash is not None:
            self._hash.append(np.asarray(phash, np.uint64))
        self._held += len(emb)
        while self._held >= self.per:
            self._flush(self.per)

    def _flush(self, rows: int) -> None:
        emb = np.concatenate(self._emb)
        i = len(self.listing["shards"])
        shard = f"emb{self.name}-{i:06d}.npy"
        put_npy(self.store, join_uri(self.prefix, shard), emb[:rows])
        self.listing["shards"].append(shard)
        self.listing["shard_rows"].append(rows)
        self._emb = [emb[rows:]]
        if self.hashes:
            ph = np.concatenate(self._hash)
            self.listing["phash_shards"].append(f"phash{self.name}-{i:06d}.npy")
            put_npy(self.store, join_uri(self.prefix, self.listing["phash_shards"][-1]), ph[:rows])
            self._hash = [ph[rows:]]
        self._held -= rows

    def close(self) -> dict[str, Any]:
        if self._held:
            self._flush(self._held)
        return self.listing


def write_part(
    store: ObjectStore,
    prefix: str,
    emb: np.ndarray,
    *,
    phash: np.ndarray | None = None,
    name: str = "",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> dict[str, Any]:
    """Write ``emb`` (and its ``phash`` rows) as shards under ``prefix`` (:class:`EmbeddingWriter`),
    without ``embeddings.json``; returns the part's listing for :func:`write_index`."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got {emb.shape}")
    writer = EmbeddingWriter(
        store, prefix, emb.shape[1], hashes=phash is not None, name=name, rows_per_shard=rows_per_shard
    )
    writer.add(emb, phash)
    return writer.close()


def write_index(
    store: ObjectStore, prefix: str, parts: list[dict[str, Any]], dim: int, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``embeddings.json`` listing the parts' shards in order (what makes the prefix complete)."""
    shards = [s for p in parts for s in p["shards"]]
    rows = [int(r) for p in parts for r in p["shard_rows"]]
    has_phash = bool(parts) and all("phash_shards" in p for p in parts)
    info = {
        "count": int(sum(rows)),
        "dim": int(dim),
        "dtype": "float16",
        "shards": shards,
        "shard_rows": rows,
        "has_phash": has_phash,
        **({"phash_shards": [s for p in parts for s in p["phash_shards"]]} if has_phash else {}),
        **(meta or {}),
    }
    store.put_json(join_uri(prefix, META), info)
    return info


def write_embeddings(
    store: ObjectStore,
    prefix: str,
    emb: np.ndarray,
    *,
    phash: np.ndarray | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One writer's embeddings (and hashes) under ``prefix``, ``embeddings.json`` last."""
    emb = np.asarray(emb)
    part = write_part(store, prefix, emb, phash=phash, rows_per_shard=rows_per_shard)
    return write_index(store, prefix, [part], part["dim"], meta)


def read_meta(store: ObjectStore, prefix: str) -> dict[str, Any]:
    uri = join_uri(prefix, META)
    if not store.exists(uri):
        raise SpecError(f"no embeddings at {prefix} ({uri} is missing): run the embed stage first")
    return store.get_json(uri)


def shard_rows(meta: dict[str, Any]) -> list[int]:
    """Rows of each shard (older listings give only ``rows_per_shard``: every shard full but the last)."""
    if "shard_rows" in meta:
        return [int(r) for r in meta["shard_rows"]]
    per, n, k = int(meta.get("rows_per_shard", meta["count"] or 1)), int(meta["count"]), len(meta["shards"])
    return [min(per, n - i * per) for i in range(k)]


class EmbeddingReader:
    """Rows of an embeddings prefix, read shard by shard (the last shard read is kept)."""

    def __init__(self, store: ObjectStore, prefix: str, meta: dict[str, Any] | None = None):
        self.store, self.prefix = store, prefix
        self.meta = meta or read_meta(store, prefix)
        rows = shard_rows(self.meta)
        self.starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        if self.starts[-1] != self.meta["count"]:
            raise SpecError(
                f"embeddings at {prefix} list {int(self.starts[-1])} rows in their shards, "
                f"their metadata says {self.meta['count']}"
            )
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def shard(self, i: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != i:
            a = get_npy(self.store, join_uri(self.prefix, self.meta["shards"][i]))
            want = int(self.starts[i + 1] - self.starts[i])
            if a.ndim != 2 or len(a) != want or a.shape[1] != self.dim:
                raise SpecError(
                    f"embedding shard {self.meta['shards'][i]} at {self.prefix} is {a.shape}, its listing "
                    f"says [{want}, {self.dim}]"
                )
            self._cached = (i, a)
        return self._cached[1]

    def rows(self, lo: int, hi: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``[lo, hi)`` as ``dtype``."""
        lo, hi = max(0, lo), min(hi, len(self))
        out = np.empty((max(0, hi - lo), self.dim), dtype)
        if hi <= lo:
            return out
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        at = lo
        for i in range(first, len(self.meta["shards"])):
            s, e = int(self.starts[i]), int(self.starts[i + 1])
            if s >= hi:
                break
            a, b = max(at, s), min(hi, e)
            if b > a:
                out[a - lo : b - lo] = self.shard(i)[a - s : b - s]
                at = b
        return out

    def take(self, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """The given rows (any order), reading each shard that holds one of them once."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            out[sel] = self.shard(int(i))[rows[sel] - self.starts[i]]
        return out

    def blocks(self, block_rows: int, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` blocks of at most ``block_rows`` rows, in order."""
        for lo in range(0, len(self), block_rows):
            yield lo, self.rows(lo, lo + block_rows, dtype)


def read_embeddings(
    store: ObjectStore, prefix: str, dtype: Any = np.float32
) -> tuple[np.ndarray, dict[str, Any]]:
    """All rows in memory (small sets; large ones stream through :class:`EmbeddingReader`)."""
    reader = EmbeddingReader(store, prefix)
    return reader.rows(0, len(reader), dtype), reader.meta


def read_phash(store: ObjectStore, prefix: str) -> np.ndarray | None:
    """uint64 [N, 2] perceptual hashes of the rows, or None when the embed stage wrote none."""
    meta = read_meta(store, prefix)
    if "phash_shards" in meta:
        parts = [get_npy(store, join_uri(prefix, s)) for s in meta["phash_shards"]]
        out = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
        if len(out) != meta["count"]:
            raise SpecError(f"hashes at {prefix} hold {len(out)} rows, the embeddings {meta['count']}")
        return out
    uri = join_uri(prefix, "phash.npy")
    return get_npy(store, uri) if store.exists(uri) else None


def copy_rows(
    store: ObjectStore,
    src: EmbeddingReader,
    rows: np.ndarray,
    prefix: str,
    *,
    phash: np.ndarray | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The embeddings of ``rows`` (sorted, ascending) of ``src``, written under ``prefix`` in that
    order, reading one source shard at a time (``phash``: the selected rows' hashes)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) > 1 and (np.diff(rows) <= 0).any():
        raise ValueError("copy_rows: rows must be sorted and distinct")
    if phash is not None and len(phash) != len(rows):
        raise ValueError(f"phash rows {len(phash)} != selected rows {len(rows)}")
    writer = EmbeddingWriter(store, prefix, src.dim, hashes=phash is not None, rows_per_shard=rows_per_shard)
    which = np.searchsorted(src.starts, rows, side="right") - 1
    at = 0
    for i in np.unique(which):
        sel = rows[which == i] - src.starts[i]
        writer.add(src.shard(int(i))[sel], None if phash is None else phash[at : at + len(sel)])
        at += len(sel)
    return write_index(store, prefix, [writer.close()], src.dim, meta)
