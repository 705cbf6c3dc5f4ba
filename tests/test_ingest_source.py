"""Dataset folders: `dinoflow upload` puts Fashion-MNIST or any folder in the real embedded store, the
ingest stage reads it by source_uri, and the ledger makes a second ingest read only what is new."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dinoflow.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinoflow.data.manifest import read_manifest
from dinoflow.errors import SpecError
from dinoflow.stages import get_stage


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dinoflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _ingest(store, out: str, **spec):
    stage = get_stage("ingest")
    return stage.run(stage.parse_spec({"output_uri": out, **spec}), store)


def test_upload_fashion_mnist_then_ingest_it_by_its_folder(store, s3_env, bucket_uri, fmnist_dir, tmp_path):
    raw = f"{bucket_uri}/raw"
    up = _cli("upload", "--to", raw, "--fashion-mnist", str(fmnist_dir), env=s3_env)
    assert up.returncode == 0, up.stderr
    assert f"{raw}/fashion-mnist: 5 object(s) uploaded" in up.stdout
    again = _cli("upload", "--to", raw, "--fashion-mnist", str(fmnist_dir), env=s3_env)
    assert "0 object(s) uploaded" in again.stdout and "4 already there" in again.stdout  # + dataset.json kept
    res = _ingest(store, f"{bucket_uri}/ing", source_uri=f"{raw}/fashion-mnist", limit_per_split=300)
    assert res.counts == {"test": 300, "train": 300}
    _, labels = load_fashion_mnist("train")
    table = read_manifest(store, res.manifests["train"])
    assert table.column("label").to_pylist() == labels[:300].tolist()
    assert set(table.column("source").to_pylist()) == {"fashion-mnist"}  # from dataset.json
    assert set(res.label_counts["train"]) <= set(FASHION_MNIST_CLASSES)  # class names from dataset.json
    # new images added to the dataset later (no class folder: unlabelled) keep its dataset.json
    (tmp_path / "new" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "new" / "train" / "n1.png")
    more = _cli("upload", str(tmp_path / "new"), "--to", raw, "--name", "fashion-mnist", env=s3_env)
    assert more.returncode == 0 and "1 object(s) uploaded" in more.stdout, more.stderr
    assert store.get_json(f"{raw}/fashion-mnist/dataset.json")["label_names"] == FASHION_MNIST_CLASSES


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)


def test_a_grown_folder_is_ingested_only_for_what_is_new(store, s3_env, bucket_uri, tmp_path):
    local = tmp_path / "pets"
    for i in range(3):
        _png(local / "train" / "cat" / f"{i}.png", 10 + i)
        _png(local / "train" / "dog" / f"{i}.png", 100 + i)
    _png(local / "test" / "cat" / "t.png", 50)
    up = _cli("upload", str(local), "--to", f"{bucket_uri}/raw", env=s3_env)
    assert up.returncode == 0, up.stderr
    src, seen = f"{bucket_uri}/raw/pets", f"{bucket_uri}/ingested"
    first = _ingest(
        store, f"{bucket_uri}/i1", source_uri=src, seen_uri=seen, only_new=True, only_splits=["train"]
    )
    assert first.counts == {"train": 6} and first.skipped_seen == 0
    t = read_manifest(store, first.manifests["train"])
    assert sorted(set(t.column("label").to_pylist())) == [0, 1]  # cat, dog: class folders, sorted
    # two new images arrive; re-uploading keeps what is already there
    _png(local / "train" / "cat" / "9.png", 200)
    _png(local / "train" / "dog" / "9.png", 201)
    assert (
        "2 object(s) uploaded" in _cli("upload", str(local), "--to", f"{bucket_uri}/raw", env=s3_env).stdout
    )
    second = _ingest(
        store, f"{bucket_uri}/i2", source_uri=src, seen_uri=seen, only_new=True, only_splits=["train"]
    )
    assert second.counts == {"train": 2} and second.skipped_seen == 6
    keys = read_manifest(store, second.manifests["train"]).column("key").to_pylist()
    assert not set(keys) & set(t.column("key").to_pylist())  # keys stay unique across runs
    # a rerun of the same ingest reuses its result; a new run finds nothing new and says so
    assert (
        _ingest(
            store, f"{bucket_uri}/i2", source_uri=src, seen_uri=seen, only_new=True, only_splits=["train"]
        )
        == second
    )
    third = _ingest(
        store, f"{bucket_uri}/i3", source_uri=src, seen_uri=seen, only_new=True, only_splits=["train"]
    )
    assert third.manifests == {} and third.counts == {} and third.skipped_seen == 8
    assert third.seen_record_uri is None
    # the ledger: one record per run that read something, naming exactly what it read
    records = [store.get_json(u) for u in store.list(seen + "/")]
    assert sorted(len(r["objects"]) for r in records) == [2, 6]


def test_upload_refuses_to_overwrite_and_bad_folders_fail_in_one_line(store, s3_env, bucket_uri, tmp_path):
    local = tmp_path / "d"
    _png(local / "train" / "a" / "1.png", 1)
    assert _cli("upload", str(local), "--to", f"{bucket_uri}/raw", env=s3_env).returncode == 0
    _png(local / "train" / "a" / "1.png", 2)
    (local / "train" / "a" / "1.png").write_bytes(b"x" * 5)  # same key, other content
    _png(local / "train" / "a" / "2.png", 3)
    r = _cli("upload", str(local), "--to", f"{bucket_uri}/raw", env=s3_env)
    assert r.returncode == 2 and "already holds a different object" in r.stderr
    assert not store.exists(f"{bucket_uri}/raw/d/train/a/2.png")  # nothing uploaded on a conflict
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", 1)
    r = _cli("upload", str(tmp_path / "flat"), "--to", f"{bucket_uri}/raw", env=s3_env)
    assert r.returncode == 2 and "outside a split folder" in r.stderr.strip().splitlines()[-1]
    with pytest.raises(SpecError, match="holds no input files"):
        _ingest(store, f"{bucket_uri}/o", source_uri=f"{bucket_uri}/raw/nothing-here")
    with pytest.raises(SpecError, match="not both"):
        get_stage("ingest").parse_spec(
            {"output_uri": f"{bucket_uri}/o", "source_uri": "s3://b/x", "splits": {"a": ["x"]}, "source": "s"}
        )
    with pytest.raises(SpecError, match="only_new needs seen_uri"):
        get_stage("ingest").parse_spec(
            {"output_uri": f"{bucket_uri}/o", "source_uri": "s3://b/x", "only_new": True}
        )


def test_dataset_json_names_the_classes(store, bucket_uri):
    root = f"{bucket_uri}/raw/two"
    for name, value in (("train/b/1.png", 1), ("train/a/2.png", 2)):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, "PNG")
        store.put_bytes(f"{root}/{name}", buf.getvalue())
    store.put_bytes(f"{root}/dataset.json", json.dumps({"source": "two", "label_names": ["b", "a"]}).encode())
    res = _ingest(store, f"{bucket_uri}/o", source_uri=root)
    from dinoflow.data.dataset import load_images

    x, y = load_images(store, res.manifests["train"])
    # label = the index of the image's class folder in dataset.json's label_names, not sorted names
    assert {int(img.max()): int(lab) for img, lab in zip(x, y, strict=True)} == {1: 0, 2: 1}
    assert res.label_counts["train"] == {"b": 1, "a": 1}
