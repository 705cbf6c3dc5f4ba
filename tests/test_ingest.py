"""The ingest stage on real Fashion-MNIST files and on bad inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from dinoflow.data.dataset import load_images
from dinoflow.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinoflow.data.ingest import fashion_mnist_spec
from dinoflow.data.manifest import read_manifest
from dinoflow.errors import DinoflowError, SpecError
from dinoflow.stages import get_stage


def _png(value=0, size=(10, 12)):
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_fashion_mnist_subset(store, bucket_uri, fmnist_dir):
    stage = get_stage("ingest")
    spec = stage.parse_spec(fashion_mnist_spec(f"{bucket_uri}/fm", str(fmnist_dir), limit_per_split=1500))
    res = stage.run(spec, store)
    assert res.counts == {"train": 1500, "test": 1500}
    raw_train, labels = load_fashion_mnist("train")
    expect = {
        FASHION_MNIST_CLASSES[k]: int(v)
        for k, v in zip(*np.unique(labels[:1500], return_counts=True), strict=True)
    }
    assert res.label_counts["train"] == expect
    x, y = load_images(store, res.manifests["train"])
    assert np.array_equal(x[:, 0].numpy(), raw_train[:1500]) and np.array_equal(y.numpy(), labels[:1500])
    # idempotent: the same spec writes nothing new
    before = {u: store.stat(u)["etag"] for u in store.list(f"{bucket_uri}/fm/")}
    assert stage.run(spec, store) == res
    assert {u: store.stat(u)["etag"] for u in store.list(f"{bucket_uri}/fm/")} == before
    # a different spec under the same prefix is refused, nothing overwritten
    other = stage.parse_spec({**spec.model_dump(), "limit_per_split": 10})
    with pytest.raises(SpecError, match="different spec"):
        stage.run(other, store)


@pytest.mark.slow
def test_fashion_mnist_full(store, bucket_uri, fmnist_dir):
    stage = get_stage("ingest")
    res = stage.run(stage.parse_spec(fashion_mnist_spec(f"{bucket_uri}/fm", str(fmnist_dir))), store)
    assert res.counts == {"train": 60000, "test": 10000}
    assert all(v == 6000 for v in res.label_counts["train"].values())
    assert all(v == 1000 for v in res.label_counts["test"].values())


def test_folder_with_bad_files_is_quarantined(store, bucket_uri, tmp_path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(_png(1))
    (root / "dog" / "b.png").write_bytes(_png(2))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    (root / "dog" / "c.jpg").write_bytes(buf.getvalue())
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "trunc.png").write_bytes(_png(3, (64, 64))[:50])
    (root / "cat" / "notes.txt").write_bytes(b"not an image")
    (root / "cat" / "broken.jpg").write_bytes(buf.getvalue()[:40])
    stage = get_stage("ingest")
    spec = stage.parse_spec(
        {
            "output_uri": f"{bucket_uri}/f",
            "kind": "folder",
            "splits": {"all": [str(root)]},
            "source": "folder",
        }
    )
    res = stage.run(spec, store)
    assert res.counts == {"all": 3} and res.quarantined == 4
    assert res.label_counts["all"] == {"cat": 1, "dog": 2}  # class folders name the labels
    q = [json.loads(ln) for ln in store.get_bytes(res.quarantine_uri).decode().splitlines()]
    reasons = {item["input"].rsplit("/", 1)[1]: item["reason"] for item in q}
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["trunc.png"].startswith("corrupt or truncated")
    assert reasons["broken.jpg"].startswith("corrupt or truncated")
    m = read_manifest(store, res.manifests["all"])
    assert sorted(m.column("member").to_pylist()) == ["000000000.png", "000000001.png", "000000002.jpg"]


def test_shards_and_file_lists(store, bucket_uri, tmp_path):
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, data, meta in (("x1", _png(5), {"label": 4}), ("x2", b"\x89PNG garbage", {"label": 1})):
            for name, payload in ((f"{key}.png", data), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    store.put_file(f"{bucket_uri}/raw/in.tar", tar_path)
    (tmp_path / "a.png").write_bytes(_png(7))
    (tmp_path / "empty.png").write_bytes(b"")  # a real empty file is a bad image: quarantined
    (tmp_path / "list.txt").write_text(
        "".join(f"{p}\n" for p in [tmp_path / "a.png", tmp_path / "empty.png"])
    )
    stage = get_stage("ingest")
    res = stage.run(
        stage.parse_spec(
            {
                "output_uri": f"{bucket_uri}/o",
                "kind": "shards",
                "splits": {"s": [f"{bucket_uri}/raw/in.tar"]},
                "source": "tars",
            }
        ),
        store,
    )
    assert res.counts == {"s": 1} and res.quarantined == 1 and res.label_counts == {"s": {"4": 1}}
    res = stage.run(
        stage.parse_spec(
            {
                "output_uri": f"{bucket_uri}/o2",
                "kind": "files",
                "splits": {"s": [str(tmp_path / "list.txt")]},
                "source": "files",
            }
        ),
        store,
    )
    assert res.counts == {"s": 1} and res.quarantined == 1
    # a vanished local file and a missing object are read errors that stop the stage, never
    # quarantined images (see test_adversarial_ingest for the rest)
    for i, missing in enumerate([tmp_path / "missing.png", f"{bucket_uri}/raw/missing.png"]):
        (tmp_path / "list2.txt").write_text(f"{tmp_path / 'a.png'}\n{missing}\n")
        spec = {"output_uri": f"{bucket_uri}/o3-{i}", "kind": "files", "source": "files"}
        with pytest.raises(DinoflowError, match="does not exist"):
            stage.run(stage.parse_spec({**spec, "splits": {"s": [str(tmp_path / "list2.txt")]}}), store)
        assert store.read_success(f"{bucket_uri}/o3-{i}") is None


def test_wrong_spec_field_fails_before_work(tmp_path, bucket_uri):
    stage = get_stage("ingest")
    with pytest.raises(SpecError, match=r"field 'sample_per_shard': Extra inputs are not permitted"):
        stage.parse_spec(
            {
                "output_uri": bucket_uri,
                "kind": "idx",
                "splits": {"a": ["x"]},
                "source": "s",
                "sample_per_shard": 3,
            }
        )
    with pytest.raises(SpecError, match=r"field 'kind'"):
        stage.parse_spec({"output_uri": bucket_uri, "kind": "zip", "splits": {"a": ["x"]}, "source": "s"})
    with pytest.raises(SpecError, match=r"field 'output_uri'"):
        stage.parse_spec({"output_uri": "/local/path", "kind": "idx", "splits": {"a": ["x"]}, "source": "s"})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"output_uri": bucket_uri, "kind": "idx", "splits": {}, "source": "s"}))
    out = subprocess.run(
        [sys.executable, "-m", "dinoflow.cli", "stage", "ingest", "--spec", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ingest spec: field 'splits'")


def test_schema_cli_prints_every_stage():
    for name in ("ingest", "pretrain"):
        out = subprocess.run(
            [sys.executable, "-m", "dinoflow.cli", "schema", name], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["spec"]["additionalProperties"] is False and "output_uri" in doc["spec"]["properties"]
