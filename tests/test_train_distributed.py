"""The pretrain stage end to end on a real manifest in the real S3 store: 2-process torchrun (gloo,
DDP and FSDP2) matches 1 process on the same global batch; kill -9 + rerun resumes and reproduces
the uninterrupted loss trajectory; outputs are in the shared formats."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinoflow.stages import get_stage

torch.set_num_threads(2)


def _make_manifest(store, prefix: str, n: int) -> str:
    from PIL import Image

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow.data.manifest import from_rows, write_manifest
    from dinoflow.data.shards import ShardWriter

    x, y = load_fashion_mnist("train")
    rows = []
    with ShardWriter(store, prefix + "/shards") as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(x[i]).save(buf, format="PNG")
            shard, member = w.add(f"img{i:05d}", buf.getvalue(), "png", {"label": int(y[i])})
            rows.append(
                {
                    "key": f"img{i:05d}",
                    "shard": shard,
                    "member": member,
                    "source": "fashion-mnist",
                    "label": int(y[i]),
                    "width": 28,
                    "height": 28,
                    "sha256": "",
                    "split": "train",
                }
            )
    uri = prefix + "/manifest.parquet"
    write_manifest(store, uri, from_rows(rows))
    return uri


def _spec(out: str, manifest: str, **kw) -> dict:
    spec = {
        "output_uri": out,
        "manifest_uri": manifest,
        "backbone": "vit_test_p4_28",
        "steps": 3,
        "batch_size": 8,
        "checkpoint_every_steps": 3,
        # KoLeo's nearest neighbour is per process (as in DINOv2), so it is off for the equality check.
        "dinov2": {
            "head_prototypes": 64,
            "head_hidden_dim": 32,
            "head_bottleneck_dim": 16,
            "koleo_loss_weight": 0.0,
            "freeze_prototypes_epochs": 0,
        },
        "crops": {"global_crop_px": 28, "local_crops_number": 2, "local_crop_px": 12},
        "optim": {"lr_per_1024": 0.01},
    }
    spec.update(kw)
    return spec


def _params(store, ckpt_uri):
    from dinoflow.train.checkpoint import load_checkpoint

    return load_checkpoint(store, ckpt_uri)["model"]


@pytest.fixture(scope="module")
def manifest(store):
    import uuid

    return _make_manifest(store, f"s3://test-{uuid.uuid4().hex[:12]}/data", 48)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(store, bucket_uri, manifest, mode):
    stage = get_stage("pretrain")
    one = stage.run(stage.parse_spec(_spec(bucket_uri + "/one", manifest)), store)
    two = stage.run(stage.parse_spec(_spec(bucket_uri + "/two", manifest, nproc=2, distributed=mode)), store)
    assert one.steps == two.steps == 3
    p1, p2 = _params(store, one.checkpoint_uri), _params(store, two.checkpoint_uri)
    assert p1.keys() == p2.keys()
    tol = 1e-5 if mode == "ddp" else 1e-4
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=tol, atol=tol, msg=k)
    assert abs(one.final_loss - two.final_loss) < 1e-4
    # Outputs: teacher backbone in the export format, heads, curves.
    meta = store.get_json(two.backbone_uri + "/backbone.json")
    assert meta["dinoflow_backbone"] == "vit_test_p4_28" and meta["method"] == "dinov2"
    assert store.exists(two.heads_uri)
    curves = [json.loads(line) for line in store.get_bytes(two.curves_uri).decode().splitlines()]
    assert [c["step"] for c in curves] == [1, 2, 3]


def test_kill_and_resume_reproduces_trajectory(store, bucket_uri, manifest, s3_env, tmp_path):
    from dinoflow.train.checkpoint import list_checkpoints

    stage = get_stage("pretrain")
    kw = {"steps": 24, "checkpoint_every_steps": 2, "keep_checkpoints": 3}
    ref = stage.run(stage.parse_spec(_spec(bucket_uri + "/ref", manifest, **kw)), store)

    out = bucket_uri + "/killed"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(_spec(out, manifest, **kw)))
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinoflow.cli", "stage", "pretrain", "--spec", str(spec_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(s >= 4 for s, _ in list_checkpoints(store, out)):
            assert proc.poll() is None, "training finished before it could be killed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = list_checkpoints(store, out)[-1][0]
    assert 4 <= killed_at < 24 and store.read_success(out) is None

    resumed = stage.run(stage.parse_spec(_spec(out, manifest, **kw)), store)
    assert resumed.resumed_from_step == killed_at
    load = lambda uri: [json.loads(line) for line in store.get_bytes(uri).decode().splitlines()]  # noqa: E731
    a, b = load(ref.curves_uri), load(resumed.curves_uri)
    assert [r["step"] for r in b] == list(range(1, 25))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), rtol=1e-5, atol=1e-6
    )
    assert len(list_checkpoints(store, out)) == 3  # old checkpoints pruned


def test_bad_spec_fails_early(store, bucket_uri, manifest):
    from dinoflow.errors import SpecError

    stage = get_stage("pretrain")
    with pytest.raises(SpecError, match="backbone"):
        stage.run(stage.parse_spec(_spec(bucket_uri, manifest, backbone="vit_huge_nope")), store)
    with pytest.raises(SpecError, match="divisible"):
        stage.run(stage.parse_spec(_spec(bucket_uri, manifest, batch_size=9, nproc=2)), store)
    with pytest.raises(SpecError, match="crops"):
        stage.parse_spec(
            {**_spec(bucket_uri, manifest), "crops": {"global_scale_min": 0.9, "global_scale_max": 0.5}}
        )
