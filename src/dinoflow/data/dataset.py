"""Reading images back: a streaming ``IterableDataset`` over a manifest (split across distributed
ranks and DataLoader workers without duplicates or gaps) and an in-memory loader for small sets."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dinoflow.data.images import decode_image
from dinoflow.data.manifest import read_manifest
from dinoflow.data.shards import ShardIndex, iter_shard
from dinoflow.errors import SpecError
from dinoflow.settings import S3Settings
from dinoflow.storage.client import ObjectStore


def partition(
    n: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    *,
    pad: bool = False,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices one (rank, worker) reads. Over all ranks and workers every row appears exactly
    once; with ``pad`` each rank gets ``ceil(n / world_size)`` rows (rows repeated from the start,
    for training where every rank must take the same number of steps)."""
    idx = np.arange(n) if order is None else order
    if pad and n % world_size:
        extra = world_size - n % world_size
        idx = np.concatenate([idx, idx[:extra]])
    return idx[rank::world_size][worker::num_workers]


class ManifestDataset(IterableDataset):
    """Stream ``(transform(image), label, row_index)`` from a manifest's shards.

    Shards are downloaded once into the local cache and members read by offset. Call
    ``set_epoch`` between epochs when ``shuffle`` is on.
    """

    def __init__(
        self,
        settings: S3Settings,
        manifest: pa.Table | str,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        pad: bool = False,
        mode: str | None = None,
    ):
        self.settings = settings
        if isinstance(manifest, str):
            manifest = read_manifest(ObjectStore(settings), manifest)
        if manifest.num_rows == 0:
            raise SpecError("manifest is empty: nothing to read")
        if not 0 <= rank < world_size:
            raise SpecError(f"rank {rank} outside world size {world_size}")
        self.shard = manifest.column("shard").to_pylist()
        self.member = manifest.column("member").to_pylist()
        self.label = manifest.column("label").to_numpy(zero_copy_only=False)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.pad, self.mode = shuffle, seed, pad, mode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.shard)
        return math.ceil(n / self.world_size) if self.pad else len(range(self.rank, n, self.world_size))

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order = None
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.shard))
        rows = partition(
            len(self.shard), self.rank, self.world_size, worker, num_workers, pad=self.pad, order=order
        )
        index = ShardIndex(ObjectStore(self.settings))
        for i in rows:
            img = decode_image(index.read(self.shard[i], self.member[i]))
            if self.mode:
                img = img.convert(self.mode)
            yield (self.transform(img) if self.transform else img), int(self.label[i]), int(i)


def _stack(items: list) -> torch.Tensor | np.ndarray:
    return np.stack(items) if isinstance(items[0], np.ndarray) else torch.stack(items)


class RowBatches(IterableDataset):
    """A manifest's rows as whole batches ``(stacked transform outputs..., rows)``: batch ``b`` holds
    rows ``[b*batch_size, (b+1)*batch_size)`` (numbered from ``first_row``), whatever the number of
    DataLoader workers (worker w of K prepares batches w, w+K, ...; the loader returns them in order).
    ``transform`` maps each decoded image to tensors or numpy arrays; ``batch_transform``, if given,
    maps the stacked tensors (arrays) of a batch (work that is cheaper a batch at a time) to tensors. Use with
    ``DataLoader(batch_size=None)``."""

    def __init__(
        self,
        settings: S3Settings,
        manifest: pa.Table,
        batch_size: int,
        transform: Callable[[Image.Image], tuple[torch.Tensor, ...]],
        first_row: int = 0,
        batch_transform: Callable[..., tuple[torch.Tensor, ...]] | None = None,
    ):
        self.settings, self.batch_size, self.transform, self.first_row = (
            settings,
            batch_size,
            transform,
            first_row,
        )
        self.batch_transform = batch_transform
        self.shard = manifest.column("shard").to_pylist()
        self.member = manifest.column("member").to_pylist()

    def __len__(self) -> int:
        return math.ceil(len(self.shard) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = ShardIndex(ObjectStore(self.settings))
        n, b = len(self.shard), self.batch_size
        for lo in range(worker * b, n, workers * b):
            rows = range(lo, min(n, lo + b))
            outs = [self.transform(decode_image(index.read(self.shard[r], self.member[r]))) for r in rows]
            stacked: list[Any] = [_stack([o[i] for o in outs]) for i in range(len(outs[0]))]
            if self.batch_transform is not None:
                stacked = list(self.batch_transform(*stacked))
            yield (*stacked, torch.arange(self.first_row + rows.start, self.first_row + rows.stop))


def load_images(
    store: ObjectStore, manifest: pa.Table | str, channels: int | None = None, size_px: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole (small) manifest into memory: uint8 ``[N, C, H, W]`` and int64 labels, in
    manifest order. Shards are read sequentially, once each."""
    if isinstance(manifest, str):
        manifest = read_manifest(store, manifest)
    n = manifest.num_rows
    if n == 0:
        raise SpecError("manifest is empty: nothing to load")
    shard_col = manifest.column("shard").to_pylist()
    member_col = manifest.column("member").to_pylist()
    rows_by_shard: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(shard_col):
        rows_by_shard[s].append(i)
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    out: np.ndarray | None = None
    found = np.zeros(n, dtype=bool)
    for shard, rows in rows_by_shard.items():
        wanted = {member_col[i]: i for i in rows}
        for key, sample in iter_shard(store, shard):
            for ext, data in sample.items():
                i = wanted.get(f"{key}.{ext}")
                if i is None:
                    continue
                img = decode_image(data)
                if mode:
                    img = img.convert(mode)
                if size_px and img.size != (size_px, size_px):
                    img = img.resize((size_px, size_px), Image.BILINEAR)
                arr = np.asarray(img)
                if arr.ndim == 2:
                    arr = arr[:, :, None]
                if out is None:
                    out = np.zeros((n, *arr.shape), dtype=np.uint8)
                if arr.shape != out.shape[1:]:
                    raise SpecError(
                        f"images differ in size/channels ({arr.shape} vs {out.shape[1:]}): pass size_px and channels"
                    )
                out[i] = arr
                found[i] = True
    if out is None or not found.all():
        miss = int(np.flatnonzero(~found)[0])
        raise SpecError(
            f"{int((~found).sum())} of {n} manifest rows have no image in their shard (first: member "
            f"{member_col[miss]!r} of {shard_col[miss]}): the manifest does not match its shards; re-run "
            "the stage that wrote them"
        )
    labels = torch.from_numpy(manifest.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels


def to_png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
