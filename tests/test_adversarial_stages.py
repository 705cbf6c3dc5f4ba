"""Probes shared by every stage: spec files and values a careless user writes (one line, never a
traceback), what killed writers leave behind (cleaned by the next stage), and what a training
process exposes on the network by default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dinoflow.errors import SpecError, StorageError
from dinoflow.stages import get_stage
from dinoflow.storage import ObjectStore, parse_uri
from dinoflow.storage.client import local_tmp_dir, local_tmp_file


def _cli_stage(name: str, spec_path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dinoflow.cli", "stage", name, "--spec", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_spec_files_that_are_not_utf8_text_or_are_a_directory_fail_in_one_line(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"output_uri": "s3://bkt/x", "source": "caf\xe9"}'.encode("latin-1"))
    folder = tmp_path / "a-folder.json"
    folder.mkdir()
    for path, says in ((bad, "is not UTF-8 text"), (folder, "is a directory")):
        out = _cli_stage("ingest", path)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1] == f"error: spec file {path} {says}" + (
            " (byte 43: b'\\xe9'); save it as UTF-8 JSON" if path == bad else ", not a file"
        )


@pytest.mark.parametrize(
    "stage, spec, says",
    [
        (
            "ingest",
            {"output_uri": "s3://bkt/run/../other", "kind": "files", "splits": {"s": ["x"]}, "source": "s"},
            "'.' and '..' are not allowed",
        ),
        (
            "pretrain",
            {"output_uri": "s3://bkt/p", "manifest_uri": "s3://bkt/m", "image_px": 10**12},
            "image_px",
        ),
        (
            "pretrain",
            {"output_uri": "s3://bkt/p", "manifest_uri": "s3://bkt/m", "crops": {"global_crop_px": 10**9}},
            "crops.global_crop_px",
        ),
        ("embed", {"output_uri": "s3://bkt/e", "manifest_uri": "s3://bkt/m", "image_px": 10**12}, "image_px"),
    ],
)
def test_absurd_values_are_one_line_spec_errors(stage, spec, says):
    with pytest.raises(SpecError) as e:
        get_stage(stage).parse_spec(spec)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("uri", ["s3://bkt/a/../b", "s3://bkt/./a", "s3://bkt/a/..", "s3://bkt/a\nb"])
def test_relative_or_control_keys_are_refused_wherever_a_uri_is_used(store, uri):
    with pytest.raises(StorageError) as e:
        parse_uri(uri)
    assert "\n" not in str(e.value).replace(repr(uri), "")
    with pytest.raises(StorageError):
        store.get_bytes(uri)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from dinoflow.settings import S3Settings
    from dinoflow.storage import ObjectStore
    from dinoflow.train.checkpoint import save_checkpoint
    # dies like kill -9 between the temporary upload and the publishing copy
    store = ObjectStore(S3Settings(), crash_hook=lambda uri: os.kill(os.getpid(), signal.SIGKILL))
    save_checkpoint(store, sys.argv[1], 1, {"model": {"w": torch.zeros(1000, 1000)}, "config": {}}, 2)
    """
)


def test_what_a_killed_save_leaves_is_cleaned_by_the_next_stage(
    embedded_store, store, s3_env, bucket_uri, tmp_path
):
    """The issue's probe: a pretrain killed mid-save left 300 MB of local .pt files and `_tmp/` keys
    that nothing ever removed."""
    bucket = parse_uri(bucket_uri)[0]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, f"{bucket_uri}/train"], env={**os.environ, **s3_env}
    )
    assert proc.wait(timeout=120) == -9
    left_local = [f for f in local_tmp_dir().iterdir() if f.name.startswith(f"{proc.pid}-")]
    assert left_local and all(f.stat().st_size > 1_000_000 for f in left_local)
    tmp_keys = [o.object_name for o in store._client.list_objects(bucket, prefix="_tmp/", recursive=True)]
    assert tmp_keys
    live = local_tmp_file(".pt")  # a live process's file is never touched
    try:
        # the next stage in that bucket (any stage) cleans both (here every `_tmp/` key counts as stale)
        impatient = ObjectStore(embedded_store.settings().model_copy(update={"tmp_max_age_seconds": 0}))
        (tmp_path / "a.png").write_bytes(_tiny_png())
        stage = get_stage("ingest")
        spec = {
            "output_uri": f"{bucket_uri}/ingest",
            "kind": "files",
            "splits": {"s": [str(tmp_path / "a.png")]},
        }
        stage.run(stage.parse_spec({**spec, "source": "t"}), impatient)
        assert not [f for f in left_local if f.exists()]
        assert live.exists()
        assert not list(store._client.list_objects(bucket, prefix="_tmp/", recursive=True))
    finally:
        live.unlink(missing_ok=True)


def _tiny_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_training_process_serves_metrics_on_loopback_unless_told(monkeypatch):
    from dinoflow import metrics

    monkeypatch.delenv("DINOFLOW_METRICS_ADDR", raising=False)
    server = metrics.serve_metrics(0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        # not reachable through another local address of this machine
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {
            "127.0.0.1"
        }
        for ip in others - {"127.0.1.1"}:
            with pytest.raises(OSError), socket.create_connection((ip, server.server_port), timeout=2):
                pass
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("DINOFLOW_METRICS_ADDR", "0.0.0.0")  # the pod's setting (chart's training runtime)
    server = metrics.serve_metrics(0)
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()


def test_spec_json_bytes_that_are_not_utf8_are_one_line(tmp_path):
    with pytest.raises(SpecError) as e:
        get_stage("ingest").parse_spec(b'{"output_uri": "s3://bkt/x\xff"}')
    assert "\n" not in str(e.value)
