"""Streaming training input: images read from their shards (or an in-memory tensor) as a stream,
decoded and geometrically cropped per image in DataLoader workers, never loaded whole.

The stream is a pure function of ``(seed, step)``, so it can be re-entered at any step (exact resume)
and it gives the same global batch whatever the number of processes and workers:

* **Streams.** The global batch is assembled from ``L`` logical streams (``L`` fixed by the config,
  not by the world size). Stream ``k`` fills rows ``[k*B//L, (k+1)*B//L)`` of every global batch of
  ``B`` rows. Rank ``r`` of ``W`` owns streams ``[r*L/W, (r+1)*L/W)`` (their rows are exactly its
  slice of the global batch); its DataLoader worker ``w`` of ``K`` owns every ``K``-th of those.
* **Epochs.** For epoch ``e`` the shards are permuted (seeded by ``(seed, e)``) and their rows
  concatenated; stream ``k`` takes positions ``[k*N//L, (k+1)*N//L)`` of that sequence: a contiguous
  run of whole shards (a boundary shard is shared by two neighbours), so over all streams every row
  appears exactly once per epoch, and each stream reads only its own shards.
* **Shuffle buffer.** Each stream's epoch passes through a shuffle buffer of ``buffer`` rows (seeded
  by ``(seed, e, k)``), computed on row indices, so a stream's order is known without reading a
  byte; reads stay within a window of ``buffer`` rows of the shard sequence.
* **Position.** Stream ``k`` yields ``rows_k`` samples per step; after ``s`` steps it has consumed
  ``s * rows_k`` samples, i.e. epoch ``s*rows_k // n_k`` at offset ``s*rows_k % n_k``. Streams run on
  from epoch to epoch (an infinite sampler, as in DINOv2); the checkpoint records these positions.
* **Crops.** Each sample's random-resized crops (+ flips) are cut from the original image at its own
  size and aspect ratio, with a generator seeded by ``(seed, k, epoch, offset)``: the same sample
  gets the same crops on 1 process or N. Photometric augmentation is left to the method's
  ``prepare`` on the device, drawn for the global batch from the step's shared generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinoflow.errors import SpecError

_MODES = {1: "L", 3: "RGB"}


# -- geometry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropGroup:
    """``n`` random-resized crops of ``px`` square, area fraction in ``scale``, aspect in ``ratio``."""

    n: int
    px: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


def crop_box(rng: np.random.Generator, w: int, h: int, scale, ratio) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(x0, y0, x1, y1)`` in pixels of a ``w`` x ``h`` image: area a
    fraction in ``scale`` of the image's, aspect log-uniform in ``ratio``; ten tries, then the
    central crop at the nearest allowed aspect (torchvision's rule)."""
    area = w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        a = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def crop_image(img: Image.Image, groups: list[CropGroup], rng: np.random.Generator) -> list[np.ndarray]:
    """uint8 ``[n, C, px, px]`` per group, cut from ``img`` (already in the wanted mode) at its own
    size and aspect (PIL's antialiased bilinear resize of the box)."""
    out = []
    w, h = img.size
    for g in groups:
        crops = []
        for _ in range(g.n):
            box = crop_box(rng, w, h, g.scale, g.ratio)
            c = img.resize((g.px, g.px), Image.BILINEAR, box=box)
            if rng.random() < g.flip_p:
                c = c.transpose(Image.FLIP_LEFT_RIGHT)
            a = np.asarray(c)
            crops.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        out.append(np.stack(crops))
    return out


# -- sources -------------------------------------------------------------------------------------
class ImageSource:
    """Rows grouped in shards (the unit a stream reads whole); ``read(row)`` decodes one image."""

    shard_sizes: np.ndarray  # int64 [shards]: rows of each shard

    def __len__(self) -> int:
        return int(self.shard_sizes.sum())

    def rows_of(self, shard: int) -> np.ndarray:
        """Row ids of shard ``shard``, in reading order."""
        raise NotImplementedError

    def read(self, row: int) -> Image.Image:
        raise NotImplementedError

    def sample_images(self, max_images: int, px: int, channels: int) -> torch.Tensor:
        """uint8 ``[n, C, px, px]``: the first ``max_images`` rows squashed to ``px`` (for fitting
        data-dependent parts of a method, e.g. SplitMask's k-means tokenizer)."""
        rows: list[int] = []
        for s in range(len(self.shard_sizes)):
            rows += self.rows_of(s)[: max_images - len(rows)].tolist()
            if len(rows) >= max_images:
                break
        arr = [
            np.asarray(self.read(int(i)).convert(_MODES[channels]).resize((px, px), Image.BILINEAR))
            for i in rows
        ]
        x = torch.from_numpy(np.stack(arr))
        return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()


class TensorSource(ImageSource):
    """An in-memory uint8 ``[N, C, H, W]`` tensor as a source (tests, benches, tiny sets)."""

    def __init__(self, images: torch.Tensor, rows_per_shard: int = 1024):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise SpecError(
                f"training images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        n = images.shape[0]
        self.rows_per_shard = rows_per_shard
        self.shard_sizes = np.array(
            [min(rows_per_shard, n - i) for i in range(0, n, rows_per_shard)], dtype=np.int64
        )
        self.channels = images.shape[1]

    def rows_of(self, shard: int) -> np.ndarray:
        lo = shard * self.rows_per_shard
        return np.arange(lo, lo + int(self.shard_sizes[shard]))

    def read(self, row: int) -> Image.Image:
        a = self.images[row].numpy()
        return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))

    def sample_images(self, max_images: int, px: int, channels: int) -> torch.Tensor:
        x = self.images[:max_images]
        if x.shape[-2:] != (px, px) or x.shape[1] != channels:
            return super().sample_images(max_images, px, channels)
        return x


class _Runs:
    """A manifest's rows as runs of consecutive rows in one shard (first row, count, shard id), built
    batch by batch: a manifest that lists each shard's rows together (as every stage writes them)
    costs a few numbers per shard, whatever its number of rows."""

    def __init__(self) -> None:
        self.shard_ids: dict[str, int] = {}
        self.first: list[np.ndarray] = []
        self.count: list[np.ndarray] = []
        self.shard: list[np.ndarray] = []
        self._open: tuple[int, int, int] | None = None  # the last run, which the next batch may extend

    def add(self, rows: np.ndarray, shards: np.ndarray) -> None:
        """Rows (ascending positions in the manifest) and their shard ids."""
        if not len(rows):
            return
        cut = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shards) != 0)) + 1
        starts = np.r_[0, cut]
        counts = np.diff(np.r_[starts, len(rows)])
        first, shard = rows[starts].astype(np.int64), shards[starts].astype(np.int64)
        if self._open is not None:
            f0, c0, s0 = self._open
            if f0 + c0 == first[0] and s0 == shard[0]:
                counts[0] += c0
                first[0] = f0
            else:
                self._flush()
        self.first.append(first[:-1])
        self.count.append(counts[:-1])
        self.shard.append(shard[:-1])
        self._open = (int(first[-1]), int(counts[-1]), int(shard[-1]))

    def _flush(self) -> None:
        if self._open is not None:
            f, c, s = self._open
            self.first.append(np.array([f]))
            self.count.append(np.array([c]))
            self.shard.append(np.array([s]))
            self._open = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._flush()
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        return cat(self.first), cat(self.count), cat(self.shard)


class ManifestSource(ImageSource):
    """A manifest's rows, read from their WebDataset tar shards in object storage (each shard
    downloaded once into the local cache by the worker that reads it, members read by offset).

    The index is bounded by the number of shards, not of images: given a manifest URI, the training
    process streams the manifest's ``shard`` (and ``split``) columns once into runs of consecutive
    rows per shard, and a worker decodes member names from the manifest's Parquet row groups (one
    at a time, from the node's local copy) when it reads. Given a ``pyarrow`` table (a subset held
    anyway), its member column is used directly. ``split`` keeps only that split's rows;
    ``require_labels`` refuses unlabelled rows; ``resize_px`` squashes every image to that square
    first (only when a spec asks for it)."""

    def __init__(
        self,
        settings: Any,
        manifest: pa.Table | str,
        resize_px: int | None = None,
        *,
        split: str | None = None,
        require_labels: bool = False,
    ):
        self.settings, self.resize_px = settings, resize_px
        self.path: str | None = None
        self.member: pa.Array | None = None
        runs = _Runs()
        if isinstance(manifest, str):
            self._index_file(manifest, runs, split, require_labels)
        else:
            self._index_table(manifest, runs, split, require_labels)
        first, count, shard = runs.arrays()
        if not len(first):
            what = f" with split == {split!r}" if split is not None else ""
            raise SpecError(f"manifest {self.where} has no rows{what}: nothing to read")
        self.shards: list[str] = sorted(runs.shard_ids, key=runs.shard_ids.__getitem__)
        self._first, self._count, self._shard = first, count, shard
        self.shard_sizes = np.bincount(shard, weights=count, minlength=len(self.shards)).astype(np.int64)
        self._by_shard = np.argsort(shard, kind="stable")
        self._shard_start = np.searchsorted(shard[self._by_shard], np.arange(len(self.shards) + 1))
        self._index = None
        self._groups: dict[int, pa.Array] = {}

    def _index_file(self, uri: str, runs: _Runs, split: str | None, require_labels: bool) -> None:
        import pyarrow.parquet as pq

        from dinoflow.storage.client import ObjectStore

        self.where = uri
        self.path = str(ObjectStore(self.settings).cached(uri))
        pf = pq.ParquetFile(self.path, read_dictionary=["shard"])
        self.group_starts = np.r_[
            0, np.cumsum([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        ]
        cols = ["shard"] + (["split"] if split is not None else []) + (["label"] if require_labels else [])
        at = 0
        for batch in pf.iter_batches(batch_size=65_536, columns=cols):
            self._add(runs, batch, at, split, require_labels)
            at += batch.num_rows

    def _index_table(self, table: pa.Table, runs: _Runs, split: str | None, require_labels: bool) -> None:
        self.where = "(table)"
        self.member = table.column("member").combine_chunks()
        cols = ["shard"] + (["split"] if split is not None else []) + (["label"] if require_labels else [])
        at = 0
        for batch in table.select(cols).to_batches(max_chunksize=65_536):
            self._add(runs, batch, at, split, require_labels)
            at += batch.num_rows

    def _add(
        self, runs: _Runs, batch: pa.RecordBatch, at: int, split: str | None, require_labels: bool
    ) -> None:
        import pyarrow.compute as pc

        keep = np.ones(batch.num_rows, bool)
        if split is not None:
            keep = pc.equal(batch.column("split"), split).fill_null(False).to_numpy(zero_copy_only=False)
        if require_labels and (batch.column("label").to_numpy(zero_copy_only=False)[keep] < 0).any():
            raise SpecError(
                f"manifest {self.where} has unlabelled rows; target-only pretraining takes a labelled "
                "dataset's own train split (use target_only=false for an uncurated pool)"
            )
        col = batch.column("shard")
        if not pa.types.is_dictionary(col.type):
            col = col.dictionary_encode()
        ids = np.array(
            [runs.shard_ids.setdefault(u, len(runs.shard_ids)) for u in col.dictionary.to_pylist()]
        )
        local = col.indices.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(keep)
        runs.add(rows + at, ids[local[rows]] if len(ids) else np.zeros(0, np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None, "_groups": {}}

    def rows_of(self, shard: int) -> np.ndarray:
        runs = self._by_shard[self._shard_start[shard] : self._shard_start[shard + 1]]
        return np.concatenate([np.arange(self._first[r], self._first[r] + self._count[r]) for r in runs])

    def shard_of(self, row: int) -> str:
        r = int(np.searchsorted(self._first, row, side="right")) - 1
        return self.shards[int(self._shard[r])]

    def member_of(self, row: int) -> str:
        if self.member is not None:
            return self.member[row].as_py()
        g = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        names = self._groups.get(g)
        if names is None:  # one row group's member names at a time
            import pyarrow.parquet as pq

            names = pq.ParquetFile(self.path).read_row_group(g, columns=["member"]).column(0).combine_chunks()
            self._groups = {g: names}
        return names[row - int(self.group_starts[g])].as_py()

    def read(self, row: int) -> Image.Image:
        from dinoflow.data.images import decode_image
        from dinoflow.data.shards import ShardIndex
        from dinoflow.storage.client import ObjectStore

        if self._index is None:
            self._index = ShardIndex(ObjectStore(self.settings))
        img = decode_image(self._index.read(self.shard_of(row), self.member_of(row)))
        if self.resize_px and img.size != (self.resize_px, self.resize_px):  # the spec asks to squash
            img = img.resize((self.resize_px, self.resize_px), Image.BILINEAR)
        return img


# -- the stream ----------------------------------------------------------------------------------
def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def buffer_shuffle(rows: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``buffer`` slots gives ``rows``: fill it, then each new row
    replaces a uniformly drawn slot, whose row is emitted; finally the rest in random order."""
    n = len(rows)
    if buffer <= 1 or n <= 1:
        return rows.copy()
    b = min(buffer, n)
    slots = rows[:b].copy()
    picks = rng.integers(0, b, size=n - b)
    out = np.empty(n, dtype=rows.dtype)
    for i, j in enumerate(picks):
        out[i] = slots[j]
        slots[j] = rows[b + i]
    out[n - b :] = slots[rng.permutation(b)]
    return out


@dataclass(frozen=True)
class StreamPlan:
    """Which rows of every global batch each of ``streams`` logical streams fills."""

    n_rows: int  # images in the source
    batch_size: int  # global batch
    streams: int
    seed: int = 0
    buffer: int = 1000

    def __post_init__(self):
        if self.streams < 1 or self.streams > self.batch_size:
            raise SpecError(f"data streams {self.streams} must be in [1, batch_size {self.batch_size}]")
        if self.n_rows < self.streams:
            raise SpecError(f"{self.n_rows} images cannot feed {self.streams} data streams")

    def rows(self, k: int) -> tuple[int, int]:
        """Stream ``k``'s rows ``[lo, hi)`` of the global batch."""
        return k * self.batch_size // self.streams, (k + 1) * self.batch_size // self.streams

    def epoch_size(self, k: int) -> int:
        return (k + 1) * self.n_rows // self.streams - k * self.n_rows // self.streams

    def position(self, k: int, step: int) -> tuple[int, int]:
        """(epoch, offset) of stream ``k`` after ``step`` steps."""
        lo, hi = self.rows(k)
        return divmod(step * (hi - lo), self.epoch_size(k))

    def positions(self, step: int) -> torch.Tensor:
        """int64 ``[streams, 2]``: every stream's (epoch, offset) after ``step`` steps."""
        return torch.tensor([self.position(k, step) for k in range(self.streams)], dtype=torch.int64)

    def streams_of(self, rank: int, world_size: int) -> range:
        if self.streams % world_size:
            raise SpecError(
                f"data streams {self.streams} must be divisible by the {world_size} processes "
                "(set data.streams to a multiple of processes x DataLoader workers)"
            )
        per = self.streams // world_size
        return range(rank * per, (rank + 1) * per)

    def epoch_rows(self, source: ImageSource, k: int, epoch: int) -> np.ndarray:
        """Stream ``k``'s rows for ``epoch``, in the order it yields them."""
        sizes = np.asarray(source.shard_sizes, dtype=np.int64)
        perm = _seed(self.seed, epoch, 0x5EED).permutation(len(sizes))
        ends = np.cumsum(sizes[perm])
        lo, hi = k * self.n_rows // self.streams, (k + 1) * self.n_rows // self.streams
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(ends, hi - 1, side="right"))
        parts, start = [], int(ends[first] - sizes[perm[first]])
        for i in range(first, last + 1):
            rows = source.rows_of(int(perm[i]))
            parts.append(rows[max(0, lo - start) : hi - start])
            start += len(rows)
        return buffer_shuffle(np.concatenate(parts), self.buffer, _seed(self.seed, epoch, k, 0xB0F))

    def iter_stream(self, source: ImageSource, k: int, step: int) -> Iterator[tuple[int, int, int]]:
        """``(row, epoch, offset)`` of stream ``k`` from step ``step`` on, endlessly."""
        epoch, off = self.position(k, step)
        while True:
            rows = self.epoch_rows(source, k, epoch)
            for i in range(off, len(rows)):
                yield int(rows[i]), epoch, i
            epoch, off = epoch + 1, 0


class TrainStream(IterableDataset):
    """One rank's input: for every step from ``start`` to ``stop``, each DataLoader worker yields one
    chunk, the crops of the streams it owns; ``Batches`` puts a step's chunks back together.
    ``workers`` 0 reads in the training process (one chunk a step)."""

    def __init__(
        self,
        source: ImageSource,
        plan: StreamPlan,
        groups: list[CropGroup],
        channels: int,
        rank: int,
        world_size: int,
        start: int,
        stop: int,
        workers: int,
    ):
        self.source, self.plan, self.groups, self.channels = source, plan, groups, channels
        self.mine = plan.streams_of(rank, world_size)
        self.start, self.stop = start, stop
        self.in_process = workers == 0  # 0: decode in the training process itself
        self.workers = max(1, min(workers, len(self.mine)))

    def worker_streams(self, worker: int) -> list[int]:
        return list(self.mine)[worker :: self.workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"TrainStream built for {self.workers} workers runs under {info.num_workers}")
        ks = self.worker_streams(worker)
        its = {k: self.plan.iter_stream(self.source, k, self.start) for k in ks}
        mode = _MODES[self.channels]
        for _step in range(self.start, self.stop):
            per_group: list[list[np.ndarray]] = [[] for _ in self.groups]
            ids = []
            for k in ks:
                lo, hi = self.plan.rows(k)
                for _ in range(hi - lo):
                    row, epoch, off = next(its[k])
                    img = self.source.read(row)
                    if img.mode != mode:
                        img = img.convert(mode)
                    crops = crop_image(img, self.groups, _seed(self.plan.seed, k, epoch, off, 0xC0))
                    for g, c in zip(per_group, crops, strict=True):
                        g.append(c)
                    ids.append(row)
            yield {
                "streams": torch.tensor(ks, dtype=torch.int64),
                "rows": torch.tensor(ids, dtype=torch.int64),
                "crops": [torch.from_numpy(np.stack(g, axis=1)) for g in per_group],  # [n, b, C, px, px]
            }


def _concat(chunks: list[dict[str, Any]], plan: StreamPlan) -> dict[str, Any]:
    """Put one step's worker chunks together in stream order (rows of the global batch)."""
    if len(chunks) == 1:
        return chunks[0]
    pieces = []  # (stream, chunk, lo, hi) within the chunk
    for c in chunks:
        at = 0
        for k in c["streams"].tolist():
            lo, hi = plan.rows(k)
            pieces.append((k, c, at, at + hi - lo))
            at += hi - lo
    pieces.sort(key=lambda p: p[0])
    n_groups = len(chunks[0]["crops"])
    return {
        "streams": torch.tensor([p[0] for p in pieces]),
        "rows": torch.cat([p[1]["rows"][p[2] : p[3]] for p in pieces]),
        "crops": [
            torch.cat([p[1]["crops"][g][:, p[2] : p[3]] for p in pieces], dim=1) for g in range(n_groups)
        ],
    }


class Batches:
    """This rank's batches, one per step: the DataLoader over a ``TrainStream`` (workers decode and
    crop, batches pinned when the device is a GPU), its per-worker chunks joined in stream order."""

    def __init__(self, stream: TrainStream, pin_memory: bool = False, prefetch: int = 2):
        self.stream = stream
        workers = 0 if stream.in_process else stream.workers
        kw: dict[str, Any] = {"prefetch_factor": prefetch, "persistent_workers": False} if workers else {}
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        for _ in range(self.stream.start, self.stream.stop):
            chunks = [next(it) for _ in range(self.stream.workers)]
            yield _concat(chunks, self.stream.plan)
