"""Shards, manifests and readers against the real embedded store."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinoflow.data.dataset import ManifestDataset, load_images, partition
from dinoflow.data.images import BadImage, decode_image, encode_png
from dinoflow.data.manifest import from_rows, read_manifest, write_manifest
from dinoflow.data.shards import ShardWriter, iter_shard, read_member
from dinoflow.errors import SpecError


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8 + i % 3, 9, 3), dtype=np.uint8) for i in range(n)]


def _write(store, prefix, arrays, per_shard=4):
    rows = []
    with ShardWriter(store, prefix, per_shard) as w:
        for i, a in enumerate(arrays):
            data = encode_png(a)
            shard, member = w.add(f"{i:06d}", data, "png", {"label": i % 3})
            rows.append(
                {
                    "key": f"k{i}",
                    "shard": shard,
                    "member": member,
                    "source": "t",
                    "label": i % 3,
                    "width": a.shape[1],
                    "height": a.shape[0],
                    "sha256": "",
                    "split": "train",
                }
            )
    return rows, w.shards


def test_shard_round_trip_is_byte_exact(store, bucket_uri):
    arrays = _images(10)
    rows, shards = _write(store, f"{bucket_uri}/shards", arrays)
    assert shards == [f"{bucket_uri}/shards/shard-{i:06d}.tar" for i in range(3)]
    for r, a in zip(rows, arrays, strict=True):
        data = read_member(store, r["shard"], r["member"])
        assert data == encode_png(a)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
    samples = [s for sh in shards for s in iter_shard(store, sh)]
    assert [k for k, _ in samples] == [f"{i:06d}" for i in range(10)]
    assert set(samples[0][1]) == {"png", "json"}


def test_manifest_round_trip_and_validation(store, bucket_uri):
    rows, _ = _write(store, f"{bucket_uri}/s", _images(5))
    write_manifest(store, f"{bucket_uri}/m.parquet", from_rows(rows))
    back = read_manifest(store, f"{bucket_uri}/m.parquet")
    assert back.to_pylist() == from_rows(rows).to_pylist()
    store.put_bytes(f"{bucket_uri}/bad.parquet", b"not parquet")
    with pytest.raises(SpecError, match="not a Parquet manifest"):
        read_manifest(store, f"{bucket_uri}/bad.parquet")


@pytest.mark.parametrize("n", [13, 16])
def test_partition_covers_every_row_once(n):
    for world in (1, 2, 3):
        for workers in (1, 2):
            got = np.concatenate(
                [partition(n, r, world, w, workers) for r in range(world) for w in range(workers)]
            )
            assert sorted(got.tolist()) == list(range(n))
            padded = [
                np.concatenate([partition(n, r, world, w, workers, pad=True) for w in range(workers)])
                for r in range(world)
            ]
            assert len({len(p) for p in padded}) == 1


def test_dataloader_two_workers_two_ranks_cover_every_key_once(store, bucket_uri, embedded_store):
    rows, _ = _write(store, f"{bucket_uri}/s", _images(23), per_shard=5)
    table = from_rows(rows)
    seen = []
    for rank in range(2):
        ds = ManifestDataset(
            embedded_store.settings(),
            table,
            transform=lambda im: np.asarray(im).shape,
            rank=rank,
            world_size=2,
            shuffle=True,
            seed=3,
        )
        dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
        seen += [row for batch in dl for (_, _, row) in batch]
    assert sorted(seen) == list(range(23))


def test_load_images_in_manifest_order(store, bucket_uri):
    arrays = [np.full((6, 6), i, dtype=np.uint8) for i in range(7)]
    rows, _ = _write(store, f"{bucket_uri}/s", arrays, per_shard=3)
    table = from_rows(rows[::-1])  # reversed order across shards
    x, y = load_images(store, table)
    assert x.shape == (7, 1, 6, 6) and x.dtype == torch.uint8
    assert x[:, 0, 0, 0].tolist() == list(range(6, -1, -1))
    assert y.tolist() == [r["label"] for r in rows[::-1]]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (
            encode_png(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))[:300],
            "corrupt or truncated",
        ),
    ],
)
def test_bad_image_bytes_have_reasons(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_rejected():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(BadImage, match="corrupt or truncated"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def _tar(path, names, fmt):
    import tarfile

    with tarfile.open(path, "w", format=fmt) as t:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for i, name in enumerate(names):
            data = bytes([i % 251]) * (i * 37 % 1500)  # sizes on and off the 512-byte blocks
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_ustar_member_index_matches_tarfile_and_defers_anything_else(tmp_path):
    import tarfile

    from dinoflow.data.shards import _ustar_offsets

    names = [f"folder/im{i:05d}.{ext}" for i in range(40) for ext in ("png", "json")]
    names.append("a" * 120 + "/" + "b" * 90 + ".png")  # ustar: split into prefix and name
    plain = tmp_path / "plain.tar"
    _tar(plain, names, tarfile.USTAR_FORMAT)
    with tarfile.open(plain) as tar:
        want = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    assert _ustar_offsets(plain) == want and len(want) == len(names)
    # pax and GNU long-name headers, a truncated archive, a flipped header byte: tarfile decides
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        _tar(tmp_path / "x.tar", ["c" * 150 + ".png"], fmt)
        assert _ustar_offsets(tmp_path / "x.tar") is None
    _tar(tmp_path / "gnu.tar", ["short.png"], tarfile.GNU_FORMAT)  # GNU magic even without long names
    assert _ustar_offsets(tmp_path / "gnu.tar") is None
    data = plain.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    assert _ustar_offsets(tmp_path / "cut.tar") is None
    bad = bytearray(data)
    bad[512 + 3] ^= 1  # the first file's name: the checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    assert _ustar_offsets(tmp_path / "bad.tar") is None


def test_shard_index_reads_through_a_few_open_files_and_refuses_a_shrunk_one(tmp_path):
    import os
    import tarfile

    from dinoflow.data.shards import ShardIndex

    class Local:  # ShardIndex needs only ``cached``: the shard's local path
        def cached(self, uri):
            return tmp_path / uri

    names = [f"im{i:05d}.png" for i in range(30)]
    for k in range(6):
        _tar(tmp_path / f"s{k}.tar", names, tarfile.USTAR_FORMAT)
    index = ShardIndex(Local())
    index.OPEN_FILES = 2
    with tarfile.open(tmp_path / "s0.tar") as tar:
        want = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    for rnd in range(2):  # every shard opened, evicted and opened again
        for k in range(6):
            for name in names[rnd::7]:
                assert index.read(f"s{k}.tar", name) == want[name]
            assert len(index._files) <= 2
    fds = list(index._files.values())
    index.close()
    assert not index._files and all(not _fd_open(fd) for fd in fds)
    size = os.path.getsize(tmp_path / "s5.tar")
    index.read("s5.tar", names[-1])
    os.truncate(tmp_path / "s5.tar", size // 2)  # the cached copy shrinks after the index was read
    with pytest.raises(OSError, match="cut short"):
        index.read("s5.tar", names[-1])


def _fd_open(fd: int) -> bool:
    import os

    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_embed_hashes_a_batch_at_a_time_with_the_bits_of_one_image_at_a_time():
    from dinoflow.curation.hashing import phash_pil
    from dinoflow.stages.embed import _hash_batch, _Prep

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(40)]
    imgs += [Image.fromarray(a) for a in _images(40)]
    prep = _Prep(16, "RGB")
    outs = [prep(im) for im in imgs]
    x, h = _hash_batch(np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]))
    assert x.shape == (80, 3, 16, 16) and x.dtype == torch.uint8
    want = [np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1) for im in imgs]
    assert np.array_equal(x.numpy(), np.stack(want))  # the pixels PIL gives, channels first
    assert np.array_equal(h.numpy(), np.stack([phash_pil(im).view(np.int64) for im in imgs]))


def test_embed_loader_workers_leave_the_cores_to_a_cpu_model(monkeypatch):
    import os

    from dinoflow.stages.embed import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert loader_workers(None, "cpu") == 0  # the model's threads take every core
    assert loader_workers(None, "cpu", pixels=True) == 4
    assert loader_workers(None, "cuda") == 4
    assert loader_workers(3, "cpu") == 3  # the spec's count wins
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert loader_workers(None, "cpu") == 2
