"""Probes of the ingest stage with the inputs a careless user or an attacker hands it: unreadable
inputs, a paused store, class folders that disagree across splits, hostile tars, odd image formats,
and specs whose output would land on a finished run's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dinoflow.data.dataset import load_images
from dinoflow.data.manifest import read_manifest
from dinoflow.errors import DinoflowError, SpecError
from dinoflow.stages import get_stage


def _png(value=0, size=(6, 5), dtype=np.uint8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, dtype)).save(buf, "PNG")
    return buf.getvalue()


def _ingest(store, **spec):
    stage = get_stage("ingest")
    return stage.run(stage.parse_spec({"source": "probe", **spec}), store)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# -- read failures are errors, never quarantine ---------------------------------------------------
def test_unreadable_inputs_stop_the_stage_in_one_line(store, bucket_uri, tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(1))
    (tmp_path / "adir").mkdir()
    cases = {
        "missing": (str(tmp_path / "missing.png"), "does not exist"),
        "directory": (str(tmp_path / "adir"), "is a directory"),
        "missing-object": (f"{bucket_uri}/in/missing.png", "does not exist"),
    }
    for name, (bad, says) in cases.items():
        out = f"{bucket_uri}/{name}"
        with pytest.raises(DinoflowError) as e:
            _ingest(store, output_uri=out, kind="files", splits={"s": [str(tmp_path / "ok.png"), bad]})
        assert says in str(e.value) and "\n" not in str(e.value), (name, e.value)
        assert store.read_success(out) is None  # nothing marked finished, nothing quarantined
        assert not store.exists(f"{out}/quarantine.jsonl")


def test_a_paused_store_never_turns_an_image_into_a_quarantined_empty_file(embedded_store, store, bucket_uri):
    """The issue's probe: the store paused 5 s during a `files` ingest quarantined one image as
    'empty file (0 bytes)' and the stage succeeded with one image short."""
    n = 60
    uris = [f"{bucket_uri}/in/{i:03d}.png" for i in range(n)]
    for i, u in enumerate(uris):
        store.put_bytes(u, _png(i))
    out = f"{bucket_uri}/out"
    started = threading.Event()

    def pause_when_started():
        deadline = time.time() + 60
        while time.time() < deadline and not store.exists(f"{out}/_STARTED"):
            time.sleep(0.02)
        os.kill(embedded_store.pid, signal.SIGSTOP)
        started.set()
        try:
            time.sleep(5)
        finally:
            os.kill(embedded_store.pid, signal.SIGCONT)

    t = threading.Thread(target=pause_when_started)
    t.start()
    try:
        res = _ingest(store, output_uri=out, kind="files", splits={"s": uris}, samples_per_shard=7)
    except DinoflowError as e:  # allowed: one line, nothing marked finished; a rerun succeeds
        assert "\n" not in str(e)
        assert store.read_success(out) is None
        res = _ingest(store, output_uri=out, kind="files", splits={"s": uris}, samples_per_shard=7)
    finally:
        t.join()
    assert started.is_set()
    assert res.counts == {"s": n} and res.quarantined == 0


# -- labels ---------------------------------------------------------------------------------------
def test_class_folders_get_one_label_in_every_split_and_hidden_folders_are_no_classes(
    store, bucket_uri, tmp_path
):
    """The issue's probe: train {cat, dog} and test {dog} gave dog 1 in train and 0 in test."""
    for split, classes in (("train", ("cat", "dog")), ("test", ("dog",))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "a.png").write_bytes(_png(3))
        for junk in (".ipynb_checkpoints", "__MACOSX"):
            (tmp_path / split / junk).mkdir()
            (tmp_path / split / junk / "a.png").write_bytes(_png(4))
    res = _ingest(
        store,
        output_uri=bucket_uri,
        kind="folder",
        splits={"train": [str(tmp_path / "train")], "test": [str(tmp_path / "test")]},
    )
    assert res.counts == {"train": 2, "test": 1}
    labels = {
        s: read_manifest(store, res.manifests[s]).column("label").to_pylist() for s in ("train", "test")
    }
    assert sorted(labels["train"]) == [0, 1] and labels["test"] == [1]  # dog is 1 everywhere
    assert res.label_counts == {"train": {"cat": 1, "dog": 1}, "test": {"dog": 1}}


def test_a_dataset_folder_ignores_hidden_folders(store, bucket_uri, tmp_path):
    for c in ("cat", ".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / "ds" / "train" / c).mkdir(parents=True)
        (tmp_path / "ds" / "train" / c / "a.png").write_bytes(_png(1))
    res = _ingest(store, output_uri=bucket_uri, source_uri=str(tmp_path / "ds"))
    assert res.counts == {"train": 1} and res.label_counts == {"train": {"cat": 1}}


# -- tars -----------------------------------------------------------------------------------------
def test_tar_keys_split_on_the_basenames_first_dot_and_bad_metadata_is_quarantined(
    store, bucket_uri, tmp_path
):
    """`tar cf s.tar .` names members ./a.png, ./a.json: the old split at the path's first dot made
    every key '' and collapsed the tar into one sample; a string label or bad JSON crashed the stage."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "./a.png", _png(1))
        _add(tar, "./a.json", b'{"label": 2}')
        _add(tar, "./b.png", _png(2))
        _add(tar, "./b.json", b'{"label": "dog"}')  # a class name: mapped through label_names
        _add(tar, "v1.0/c.png", _png(3))  # a dot in a folder name is not a key boundary
        _add(tar, "v1.0/c.json", b'{"label": 0}')
        _add(tar, "v1.0/d.png", _png(4))
        _add(tar, "v1.0/d.json", b'{"label": "wolf"}')  # unknown class name
        _add(tar, "e.png", _png(5))
        _add(tar, "e.json", b"{not json")
        _add(tar, "f.png", _png(6))
        _add(tar, "f.json", b'{"label": [1]}')
        _add(tar, "g.json", b'{"label": 1}')  # no image member
    res = _ingest(
        store,
        output_uri=bucket_uri,
        kind="shards",
        splits={"s": [str(path)]},
        label_names=["cat", "dog", "eel"],
    )
    assert res.counts == {"s": 3} and res.quarantined == 4
    assert res.label_counts == {"s": {"cat": 1, "dog": 1, "eel": 1}}
    reasons = [json.loads(x)["reason"] for x in store.get_bytes(res.quarantine_uri).decode().splitlines()]
    assert any("not an integer nor one of label_names" in r for r in reasons)
    assert any("not valid JSON" in r for r in reasons)
    assert any("neither an integer nor a class name" in r for r in reasons)
    assert any("no image member" in r for r in reasons)


_PEAK_SCRIPT = """
import json, resource, sys
from dinoflow.data.ingest import iter_items
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
items = [(o, len(p) if isinstance(p, bytes) else getattr(p, "reason", "array"), l)
         for o, p, l in iter_items("shards", None, [sys.argv[1]], [])]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak, "items": items}))
"""


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_tars_stream_and_an_oversized_member_is_refused_unread(tmp_path):
    """The issue's probe: a small .tar.gz holding a huge member raised peak memory by the member's
    size (whole tars were read into memory)."""
    big = 200 << 20
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        _add(tar, "a.png", _png(1))
        info = tarfile.TarInfo("b.png")
        info.size = big
        tar.addfile(info, _Zeros(big))
        _add(tar, "c.png", _png(2))
    assert path.stat().st_size < big // 100
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [i[0].rsplit("#", 1)[1] for i in got["items"]] == ["a", "b", "c"]
    assert "too large" in got["items"][1][1]
    grew_bytes = (got["peak_kib"] - got["base_kib"]) * 1024
    assert grew_bytes < big // 4, f"peak memory grew by {grew_bytes} bytes for a {big}-byte member"


# -- image formats --------------------------------------------------------------------------------
def test_16_bit_grayscale_is_scaled_not_saturated(store, bucket_uri, tmp_path):
    """The issue's probe: a 16-bit PNG loaded as 99.6 % white pixels."""
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256 + 100).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    (tmp_path / "deep.png").write_bytes(buf.getvalue())
    res = _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": [str(tmp_path / "deep.png")]})
    want = ((ramp.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    for channels in (None, 1):  # as stored, and as training reads it (grayscale)
        x, _ = load_images(store, res.manifests["s"], channels=channels)
        assert np.array_equal(x[0, 0].numpy(), want), channels
    assert want.min() == 0 and want.max() == 254  # the ramp spans the range: saturation would show


def test_formats_are_stored_under_their_real_extension(store, bucket_uri, tmp_path):
    """The issue's probe: a PPM (or any format outside the common few) was stored as `.png`."""
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.ppm")
    Image.fromarray(rgb).save(tmp_path / "x.tif")
    res = _ingest(
        store,
        output_uri=bucket_uri,
        kind="files",
        splits={"s": [str(tmp_path / "x.ppm"), str(tmp_path / "x.tif")]},
    )
    members = read_manifest(store, res.manifests["s"]).column("member").to_pylist()
    assert [m.rsplit(".", 1)[1] for m in members] == ["ppm", "tiff"]
    x, _ = load_images(store, res.manifests["s"], channels=3)
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), rgb)


def test_a_file_list_that_names_itself_is_refused(store, bucket_uri, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(f"{b}\n")
    b.write_text(f"{a}\n")
    with pytest.raises(SpecError, match="loop"):
        _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": [str(a)]})
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(SpecError, match="not UTF-8"):
        _ingest(store, output_uri=bucket_uri + "2", kind="files", splits={"s": [str(tmp_path / "c.txt")]})


# -- finished outputs are never overwritten ---------------------------------------------------------
def _files(tmp_path, n: int, tag: str = "") -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"{tag}{i}.png"
        p.write_bytes(_png(i))
        out.append(str(p))
    return out


def test_an_output_inside_a_finished_run_is_refused(store, bucket_uri, tmp_path):
    """The issue's probe: an ingest whose output_uri lay inside a finished ingest's folder (split "")
    replaced its shard and manifest while the old _SUCCESS still claimed the old count."""
    first = _ingest(
        store, output_uri=f"{bucket_uri}/ing", kind="files", splits={"train": _files(tmp_path, 3)}
    )
    before = {u: store.stat(u)["etag"] for u in store.list(f"{bucket_uri}/ing/")}
    with pytest.raises(SpecError, match=r"field 'splits'.*split '' cannot name a folder"):
        _ingest(store, output_uri=f"{bucket_uri}/ing/train", kind="files", splits={"": _files(tmp_path, 1)})
    with pytest.raises(SpecError, match="lies inside .*ing, which holds a finished 'ingest' run"):
        _ingest(store, output_uri=f"{bucket_uri}/ing/train", kind="files", splits={"x": _files(tmp_path, 1)})
    with pytest.raises(SpecError, match="already holds"):  # a parent of it is not empty either
        _ingest(store, output_uri=bucket_uri, kind="files", splits={"ing": _files(tmp_path, 1)})
    assert {u: store.stat(u)["etag"] for u in store.list(f"{bucket_uri}/ing/")} == before
    assert store.read_success(f"{bucket_uri}/ing")["result"]["counts"] == first.counts


def test_splits_that_would_share_a_folder_are_refused_before_anything_is_written(store, bucket_uri, tmp_path):
    """The issue's probe: splits 'train' and 'train/' both landed in train/, one silently lost."""
    with pytest.raises(SpecError, match="split 'train/' cannot name a folder"):
        _ingest(
            store,
            output_uri=bucket_uri,
            kind="files",
            splits={"train": _files(tmp_path, 1), "train/": _files(tmp_path, 1, "b")},
        )
    assert store.list(bucket_uri + "/") == []


def test_a_crashed_run_is_continued_by_its_spec_and_refused_to_another(store, bucket_uri, tmp_path):
    """The issue's probe: a crashed ingest rerun with a different spec left 13 stale shards beside a
    _SUCCESS that listed 2."""
    good = _files(tmp_path, 6)
    crash = [*good, str(tmp_path / "not-yet.png")]  # the run dies reading the last input
    with pytest.raises(SpecError, match="does not exist"):
        _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": crash}, samples_per_shard=1)
    stale = [u for u in store.list(bucket_uri + "/") if u.endswith(".tar")]
    assert len(stale) == 6  # shards the crashed run flushed
    with pytest.raises(SpecError, match="unfinished outputs of a 'ingest' run with another spec"):
        _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": good[:2]}, samples_per_shard=1)
    assert [u for u in store.list(bucket_uri + "/") if u.endswith(".tar")] == stale
    # the same spec continues (its input is back), and what it marks finished is all there is
    (tmp_path / "not-yet.png").write_bytes(_png(9))
    res = _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": crash}, samples_per_shard=1)
    shards = set(read_manifest(store, res.manifests["s"]).column("shard").to_pylist())
    assert res.counts == {"s": 7} and shards == {
        u for u in store.list(bucket_uri + "/") if u.endswith(".tar")
    }


def test_a_prefix_holding_foreign_objects_is_refused(store, bucket_uri, tmp_path):
    store.put_bytes(f"{bucket_uri}/someone-elses.bin", b"keep me")
    with pytest.raises(SpecError, match="already holds 1 object"):
        _ingest(store, output_uri=bucket_uri, kind="files", splits={"s": _files(tmp_path, 1)})
    assert store.list(bucket_uri + "/") == [f"{bucket_uri}/someone-elses.bin"]
