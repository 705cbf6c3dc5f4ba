"""``dinoflow bench distill --teacher-demo DEMO_OUT``: a finished demo's teacher, read from the demo's
own embedded store (a real SeaweedFS server, started for the benchmark and stopped after)."""

from __future__ import annotations

import json

import pytest

from dinoflow.errors import StorageError
from dinoflow_tools.bench._store import demo_teacher_store


def _finished_demo(tmp_path):
    """What `dinoflow demo --out tmp_path` leaves: store/ (stopped) and summary.json naming the teacher."""
    import torch

    from dinoflow.models import create_backbone
    from dinoflow.models.export import export_backbone
    from dinoflow.storage import ObjectStore
    from dinoflow.storage.embedded import EmbeddedStore

    es = EmbeddedStore(tmp_path / "store")
    try:
        torch.manual_seed(0)
        bb = create_backbone("vit_test_p4_28")
        uri = export_backbone(
            ObjectStore(es.up().settings()),
            "s3://dinoflow-demo/runs/r/pretrain/x/backbone",
            bb,
            {"method": "dinov2"},
        )
    finally:
        es.down()
    (tmp_path / "summary.json").write_text(json.dumps({"teacher": {"backbone_uri": uri, "knn_top1": 0.5}}))
    return bb, uri


@pytest.mark.slow  # ~42 s of store start and stop: a benchmark helper, kept out of the 15-minute suite
def test_the_demos_teacher_is_served_from_its_store_which_is_stopped_after(tmp_path):
    import torch

    from dinoflow.models import load_backbone
    from dinoflow.storage.embedded import EmbeddedStore

    bb, uri = _finished_demo(tmp_path)
    with demo_teacher_store(tmp_path) as (store, teacher_uri):
        assert teacher_uri == uri
        loaded = load_backbone(store, teacher_uri)
        x = torch.rand(2, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(loaded.eval()(x), bb.eval()(x), atol=1e-6)
    assert EmbeddedStore(tmp_path / "store").status() is None  # stopped again: it was not running before


def test_a_folder_that_is_not_a_finished_demo_is_refused_by_name(tmp_path):
    with pytest.raises(StorageError, match="summary.json"), demo_teacher_store(tmp_path):
        pass
    (tmp_path / "store").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"students": {}}))
    with pytest.raises(StorageError, match="teacher.backbone_uri"), demo_teacher_store(tmp_path):
        pass


def test_two_teachers_are_refused_before_any_work():
    from dinoflow_tools.bench.distill import main

    with pytest.raises(SystemExit) as e:
        main(["--teacher-demo", "demo-out", "--teacher-uri", "s3://b/backbone"])
    assert e.value.code == 2
