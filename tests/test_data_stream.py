"""Streaming training input: the split over ranks x DataLoader workers has no gaps or repeats, the
global batch (rows and crops) does not depend on how many processes and workers read it, the stream
re-enters at any step, and any image (size, aspect, RGB or grayscale) is cropped from its original."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.data.stream import (
    Batches,
    CropGroup,
    StreamPlan,
    TensorSource,
    TrainStream,
    buffer_shuffle,
    crop_box,
)
from dinoflow.errors import SpecError

GROUPS = [CropGroup(2, 12, (0.3, 1.0)), CropGroup(1, 8, (0.05, 0.3))]


def _source(n: int = 64) -> TensorSource:
    g = torch.Generator().manual_seed(0)
    return TensorSource(
        torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8), rows_per_shard=10
    )


def _run(source, plan, world: int, workers: int, start: int, stop: int) -> list[dict]:
    """Each step's global batch, put together from every rank's batches."""
    per_rank = [
        list(Batches(TrainStream(source, plan, GROUPS, 1, r, world, start, stop, workers)))
        for r in range(world)
    ]
    return [
        {
            "rows": torch.cat([per_rank[r][s]["rows"] for r in range(world)]),
            "crops": [
                torch.cat([per_rank[r][s]["crops"][g] for r in range(world)], 1) for g in range(len(GROUPS))
            ],
        }
        for s in range(stop - start)
    ]


def test_split_over_ranks_and_workers_has_no_gaps_or_repeats_and_matches_one_reader():
    source = _source(64)
    plan = StreamPlan(64, batch_size=8, streams=8, seed=3, buffer=16)
    split = _run(source, plan, world=2, workers=2, start=0, stop=16)  # 2 epochs of 8 steps
    for epoch in range(2):
        rows = torch.cat([b["rows"] for b in split[epoch * 8 : (epoch + 1) * 8]])
        assert sorted(rows.tolist()) == list(range(64))  # every image once per epoch
    assert not torch.equal(split[0]["rows"], split[8]["rows"])  # epochs are reshuffled
    one = _run(source, plan, world=1, workers=0, start=0, stop=16)
    for a, b in zip(split, one, strict=True):
        assert torch.equal(a["rows"], b["rows"])
        for ca, cb in zip(a["crops"], b["crops"], strict=True):
            assert ca.shape[1] == 8 and torch.equal(ca, cb)  # same crops whoever cuts them


def test_stream_reenters_mid_epoch():
    source = _source(50)  # 50 images, 4 streams: streams of 12 and 13 rows, epochs out of step
    plan = StreamPlan(50, batch_size=8, streams=4, seed=1, buffer=7)
    full = _run(source, plan, world=2, workers=1, start=0, stop=20)
    resumed = _run(source, plan, world=2, workers=1, start=11, stop=20)
    for a, b in zip(full[11:], resumed, strict=True):
        assert torch.equal(a["rows"], b["rows"])
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"], strict=True))
    pos = plan.positions(11)
    assert pos.shape == (4, 2) and pos.dtype == torch.int64


def test_buffer_shuffle_is_a_permutation_local_to_the_buffer():
    rows = np.arange(1000)
    out = buffer_shuffle(rows, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == rows.tolist() and not np.array_equal(out, rows)
    assert all(out[i] < i + 50 for i in range(1000))  # never further ahead than the buffer reaches


def test_crop_box_keeps_inside_any_aspect():
    rng = np.random.default_rng(0)
    for w, h in [(300, 40), (17, 90), (5, 5), (224, 224)]:
        for _ in range(50):
            x0, y0, x1, y1 = crop_box(rng, w, h, (0.05, 1.0), (3 / 4, 4 / 3))
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_plan_refuses_a_world_size_that_does_not_divide_the_streams():
    from dinoflow.errors import SpecError

    with pytest.raises(SpecError, match="divisible"):
        StreamPlan(64, 12, 6).streams_of(0, 4)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mixed_manifest(store, prefix: str, n: int) -> str:
    """Non-square RGB images of varied sizes, a few grayscale, over several shards."""
    from dinoflow.data.manifest import from_rows, write_manifest
    from dinoflow.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    rows = []
    with ShardWriter(store, prefix + "/shards", samples_per_shard=7) as w:
        for i in range(n):
            hgt, wid = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            arr = rng.integers(0, 256, (hgt, wid) if i % 5 == 0 else (hgt, wid, 3), dtype=np.uint8)
            shard, member = w.add(f"im{i:04d}", _png(arr), "png", {})
            rows.append(
                {"key": f"im{i:04d}", "shard": shard, "member": member, "source": "synthetic", "label": -1,
                 "width": wid, "height": hgt, "sha256": "", "split": "train"}
            )  # fmt: skip
    uri = prefix + "/manifest.parquet"
    write_manifest(store, uri, from_rows(rows))
    return uri


def test_non_square_rgb_source_streams_and_trains_a_step(store, bucket_uri):
    from dinoflow.data.manifest import read_manifest
    from dinoflow.data.stream import ManifestSource
    from dinoflow.stages import get_stage

    manifest = _mixed_manifest(store, bucket_uri + "/data", 30)
    source = ManifestSource(store.settings, manifest)
    assert len(source) == 30 and len(source.shard_sizes) == 5
    # the index keeps runs of rows per shard; the table form (a subset in memory) reads the same
    table = ManifestSource(store.settings, read_manifest(store, manifest))
    assert len(source._first) == 5 and all(source.member_of(r) == table.member_of(r) for r in range(30))
    assert [source.shard_of(r) for r in range(30)] == [table.shard_of(r) for r in range(30)]
    train = ManifestSource(store.settings, manifest, split="train")
    assert len(train) == 30
    with pytest.raises(SpecError, match="no rows with split == 'val'"):
        ManifestSource(store.settings, manifest, split="val")
    plan = StreamPlan(30, batch_size=6, streams=3, seed=0, buffer=4)
    (rgb,) = Batches(TrainStream(source, plan, GROUPS, 3, 0, 1, 0, 1, workers=2))
    assert rgb["crops"][0].shape == (2, 6, 3, 12, 12) and rgb["crops"][1].shape == (1, 6, 3, 8, 8)

    stage = get_stage("pretrain")
    spec = {
        "output_uri": bucket_uri + "/out",
        "manifest_uri": manifest,
        "backbone": "vit_test_p4_28",  # grayscale: the RGB originals are converted in the workers
        "steps": 1,
        "batch_size": 6,
        "dinov2": {"head_prototypes": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8},
        "crops": {"global_crop_px": 28, "local_crops_number": 2, "local_crop_px": 12},
    }
    res = stage.run(stage.parse_spec(spec), store)
    assert res.steps == 1 and res.n_images == 30 and np.isfinite(res.final_loss)


def test_bench_data_plane_runs_small(store, s3_env, monkeypatch, capsys):
    import json

    from dinoflow_tools.bench import data_plane

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    data_plane.main(["--sizes", "200", "--rate-images", "96,32", "--rss-steps", "2", "--batch-size", "16"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["gray28_images_per_s_per_worker"] > 0 and figures["rgb224_images_per_s_per_worker"] > 0
    assert figures["peak_rss_main_mib_200_images"] > 0
