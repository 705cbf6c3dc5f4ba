"""The component runtime: upstream results -> spec fields, content-addressed outputs, UI artifacts."""

from __future__ import annotations

import json

import pytest

from dinoflow.errors import SpecError
from dinoflow.kfp import runtime
from dinoflow.stages import get_stage

INGEST = {
    "output_uri": "s3://b/r/ingest/x",
    "manifests": {"train": "s3://b/tr.parquet", "test": "s3://b/te.parquet"},
    "counts": {"train": 10, "test": 5},
}
EMBED = {
    "output_uri": "s3://b/e",
    "embeddings_uri": "s3://b/e/emb",
    "manifest_uri": "s3://b/tr.parquet",
    "backbone_uri": "s3://b/boot",
    "dim": 8,
    "count": 10,
}


def fields(stage):
    return set(get_stage(stage).spec_cls.model_fields)


def test_embed_takes_the_split_of_an_ingest_and_the_backbone_of_a_result():
    spec = runtime.fill_from_upstream(
        "embed", {"batch_size": 4}, {"manifest": INGEST, "backbone": EMBED}, fields("embed"), split="test"
    )
    assert spec == {"batch_size": 4, "manifest_uri": "s3://b/te.parquet", "backbone_uri": "s3://b/boot"}


def test_dedup_appends_eval_and_reference_sets():
    ref = {**EMBED, "embeddings_uri": "s3://b/cur/emb", "manifest_uri": "s3://b/cur.parquet"}
    spec = runtime.fill_from_upstream(
        "dedup", {}, {"pool": EMBED, "eval_set": EMBED, "reference": ref}, fields("dedup")
    )
    assert spec["embeddings_uri"] == "s3://b/e/emb"
    assert spec["eval_manifest_uris"] == ["s3://b/tr.parquet", "s3://b/cur.parquet"]
    assert spec["eval_embeddings_uris"] == ["s3://b/e/emb", "s3://b/cur/emb"]


def test_backbone_of_promote_distill_and_errors():
    assert runtime.backbone_of({"champion_uri": "s3://r/champ"}) == "s3://r/champ"
    assert runtime.backbone_of({"backbone_uris": {"a": "s3://a", "b": "s3://b"}}, "b") == "s3://b"
    with pytest.raises(SpecError, match="no student 'c'"):
        runtime.backbone_of({"backbone_uris": {"a": "s3://a"}}, "c")
    with pytest.raises(SpecError, match="no split 'val'"):
        runtime.manifest_of(INGEST, "val")
    with pytest.raises(SpecError, match="offers no backbone"):
        runtime.backbone_of({"count": 3})


def test_output_uri_is_content_addressed():
    a = runtime.output_uri_for("s3://b/runs", "v1", "embed", {"manifest_uri": "s3://x", "batch_size": 4})
    b = runtime.output_uri_for("s3://b/runs", "v1", "embed", {"batch_size": 4, "manifest_uri": "s3://x"})
    c = runtime.output_uri_for("s3://b/runs", "v1", "embed", {"manifest_uri": "s3://y", "batch_size": 4})
    d = runtime.output_uri_for("s3://b/runs", "v2", "embed", {"manifest_uri": "s3://x", "batch_size": 4})
    assert a == b and a.startswith("s3://b/runs/v1/embed/")
    assert len({a, c, d}) == 3
    with pytest.raises(SpecError, match="data_version"):
        runtime.output_uri_for("s3://b/runs", "a/b", "embed", {})
    with pytest.raises(SpecError, match="output_root"):
        runtime.output_uri_for("/tmp/x", "v1", "embed", {})


def test_run_component_bad_spec_fails_in_one_line(tmp_path, s3_env):
    with pytest.raises(SpecError, match="not valid JSON"):
        runtime.run_component("embed", "{nope", "s3://b/r", "v1", "embed", str(tmp_path / "r"))
    with pytest.raises(SpecError, match=r"embed spec: field 'batch_size'"):
        runtime.run_component(
            "embed",
            json.dumps({"manifest_uri": "s3://b/m", "batch_size": 0}),
            "s3://bkt/r",
            "v1",
            "embed",
            str(tmp_path / "r"),
        )


def test_ingest_component_runs_alone_through_kfp_local(store, bucket_uri, tmp_path):
    """One component called directly under kfp.local: result JSON + Metrics artifact, real store."""
    from kfp import local

    from dinoflow.components.ingest import ingest
    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.kfp.configs import tiny_arguments
    from dinoflow.kfp.local import _env, s3_env

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    args = tiny_arguments(fashion_mnist_paths(), bucket_uri)
    with _env(s3_env(store.settings)):
        task = ingest(spec_json=args["ingest_spec"], output_root=bucket_uri, data_version="c1")
    result = json.loads(open(task.outputs["result"].path).read())
    assert result["counts"] == {"train": 256, "test": 256}
    assert store.read_success(result["output_uri"])["result"]["counts"] == result["counts"]
    assert task.outputs["metrics"].metadata["counts.train"] == 256.0
    meta = task.outputs["result"].metadata  # a Dataset: its manifests and counts, for the UI's lineage
    assert meta["s3_uri"] == result["output_uri"] and meta["manifests"] == result["manifests"]
    assert type(task.outputs["result"]).__name__ == "Dataset"


def test_confusion_matrix_carries_class_names(tmp_path):
    from kfp.dsl import ClassificationMetrics

    from dinoflow.kfp.runtime import log_confusion

    cm = ClassificationMetrics(name="classification", uri=str(tmp_path / "cm"))
    assert log_confusion(cm, {"confusion_matrix": [[3, 1], [0, 4]], "class_names": ["Coat", "Bag"]})
    spec = cm.metadata["confusionMatrix"]
    assert [a["displayName"] for a in spec["annotationSpecs"]] == ["Coat", "Bag"]
    assert spec["rows"] == [{"row": [3, 1]}, {"row": [0, 4]}]


def test_data_version_comes_from_the_schedule_time_else_the_run_id():
    assert runtime.data_version_of("v7", "2026-01-09T13:00:00Z", "abc") == "v7"
    assert runtime.data_version_of("", "2026-01-09T13:00:00Z", "abc") == "t20260109T130000Z"
    # kfp.local (and a backend that leaves it unfilled) passes the placeholder itself
    assert runtime.data_version_of("", "{{$.pipeline_job_schedule_time_utc}}", "8d1c-7e0b") == "run-8d1c7e0b"
    with pytest.raises(SpecError, match="data_version is empty"):
        runtime.data_version_of("", "{{$.pipeline_job_schedule_time_utc}}", "{{$.pipeline_job_uuid}}")


def test_typed_defaults_sit_under_the_spec_json_and_give_way_to_splits(tmp_path, s3_env, bucket_uri):
    """A typed input fills a field the spec JSON leaves out; source_uri steps aside for named splits
    (the run fails on the missing file only after the spec was accepted)."""
    spec = {"kind": "idx", "source": "s", "splits": {"train": ["/nonexistent/a", "/nonexistent/b"]}}
    with pytest.raises(SpecError, match="does not exist"):
        runtime.run_component(
            "ingest",
            json.dumps(spec),
            bucket_uri,
            "v1",
            "ingest",
            str(tmp_path / "r"),
            defaults=runtime.typed_defaults({"source_uri": "s3://x/raw/fm", "source_kind": "auto"}),
        )


def test_a_pointer_is_read_when_the_task_runs(store, bucket_uri):
    with pytest.raises(SpecError, match="run the full pipeline first"):
        runtime.resolve_pointer(store, f"{bucket_uri}/registry/m/champion.json")
    store.put_json(f"{bucket_uri}/registry/m/champion.json", {"backbone_uri": f"{bucket_uri}/v0001"})
    champion = runtime.resolve_pointer(store, f"{bucket_uri}/registry/m/champion.json")
    spec = runtime.fill_from_upstream("pretrain", {}, {"init": champion}, fields("pretrain"))
    assert spec == {"init_backbone_uri": f"{bucket_uri}/v0001"}


def test_result_artifacts_are_typed_with_their_s3_uri_in_the_metadata():
    """Backbones are KFP Models and manifests/embeddings Datasets, with the object's s3:// URI first."""
    import yaml

    from dinoflow.kfp.compile import default_dirs

    cdir, _ = default_dirs()
    want = {"pretrain": "system.Model", "distill": "system.Model", "promote": "system.Model"}
    want.update({s: "system.Dataset" for s in ("ingest", "embed", "dedup", "curate")})
    for stage, kind in want.items():
        spec = yaml.safe_load((cdir / stage / "component.yaml").read_text())
        out = spec["root"]["outputDefinitions"]["artifacts"]["result"]["artifactType"]["schemaTitle"]
        assert out == kind, stage
    pt = runtime.describe(
        "pretrain", {"output_uri": "s3://b/p", "backbone_uri": "s3://b/p/backbone", "steps": 5}
    )
    assert pt == {
        "stage": "pretrain",
        "s3_uri": "s3://b/p/backbone",
        "output_uri": "s3://b/p",
        "backbone_uri": "s3://b/p/backbone",
        "steps": 5,
    }
    ds = runtime.describe(
        "distill", {"output_uri": "s3://b/d", "backbone_uris": {"s1": "s3://b/d/s1", "s2": "s3://b/d/s2"}}
    )
    assert ds["s3_uri"] == "s3://b/d/s1" and ds["backbone_uris"]["s2"] == "s3://b/d/s2"
    ing = runtime.describe("ingest", INGEST)
    assert ing["s3_uri"] == "s3://b/r/ingest/x" and ing["counts"] == {"train": 10, "test": 5}
