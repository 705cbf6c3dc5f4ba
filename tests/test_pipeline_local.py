"""The pipelines run end to end through kfp.local on the real embedded store, with tiny sizes.

One module-scoped full run feeds the checks: every stage ran, a cached re-run executes nothing, a
stage-only pipeline re-runs one stage from the earlier outputs, a new data version re-executes.
"""

from __future__ import annotations

import json

import pytest

from dinoflow.data.idx import fashion_mnist_paths
from dinoflow.kfp.configs import tiny_arguments
from dinoflow.kfp.local import run_pipeline

FULL_TASKS = {
    "ingest",
    "embed-pool",
    "embed-eval",
    "embed-seed",
    "dedup",
    "curate",
    "pretrain",
    "distill",
    "evaluate",
    "promote",
}


@pytest.fixture(scope="module")
def full_run(store, tmp_path_factory):
    import uuid

    from dinoflow.pipelines.full import full

    root = tmp_path_factory.mktemp("kfp-full")
    out = f"s3://test-{uuid.uuid4().hex[:12]}/runs"
    args = tiny_arguments(fashion_mnist_paths(), out, data_version="d1")
    run = run_pipeline(full, args, root, store.settings, caching=True)
    return {"run": run, "args": args, "root": root, "store": store}


def test_full_pipeline_runs_every_stage(full_run):
    run = full_run["run"]
    assert set(run.executed) == FULL_TASKS
    ev = run.result("evaluate")
    assert 0.0 <= ev["metrics"]["knn_top1"] <= 1.0
    promote = run.result("promote")
    assert promote["promoted"] is True  # an empty registry: the first challenger becomes champion
    # every stage wrote under {output_root}/{data_version}/{task}/{hash} and left its _SUCCESS marker
    root = full_run["args"]["output_root"]
    for e in run.events:
        assert e["result"]["output_uri"].startswith(f"{root}/d1/{e['task']}/")
        assert full_run["store"].read_success(e["result"]["output_uri"]) is not None
    # the embedder was bootstrapped once, then reused for the eval and seed sets
    assert run.result("embed-eval")["backbone_uri"] == run.result("embed-pool")["backbone_uri"]
    # dedup decontaminated against the eval set's embeddings
    assert run.result("dedup")["kept_count"] <= run.result("dedup")["input_count"]


def test_cached_rerun_executes_nothing(full_run):
    from dinoflow.pipelines.full import full

    again = run_pipeline(full, full_run["args"], full_run["root"], full_run["store"].settings, caching=True)
    assert again.executed == []


def test_stage_only_pipeline_reruns_one_stage_from_earlier_outputs(full_run):
    from dinoflow.pipelines.stages import PIPELINES

    run = full_run["run"]
    first = run.result("evaluate")
    spec = json.loads(full_run["args"]["evaluate_spec"])
    spec.update(
        backbone_uri=run.result("distill")["backbone_uris"][
            json.loads(full_run["args"]["distill_spec"])["students"][0]
        ],
        train_manifest_uri=run.result("ingest")["manifests"]["train"],
        test_manifest_uri=run.result("ingest")["manifests"]["test"],
        knn_k=[5],
    )
    args = {
        "spec_json": json.dumps(spec),
        "output_root": full_run["args"]["output_root"],
        "data_version": "d1",
    }
    again = run_pipeline(
        PIPELINES["evaluate"], args, full_run["root"], full_run["store"].settings, caching=True
    )
    assert again.executed == ["evaluate"]
    res = again.result("evaluate")
    assert res["output_uri"] != first["output_uri"]  # a changed spec never reuses the old output
    assert res["metrics"]["knn_top1"] == pytest.approx(first["metrics"]["knn_top1"], abs=0.25)


def test_new_data_version_reexecutes_and_same_version_hits_cache(store, bucket_uri, tmp_path):
    from dinoflow.pipelines.stages import PIPELINES

    ingest_spec = tiny_arguments(fashion_mnist_paths(), bucket_uri)["ingest_spec"]
    base = {"spec_json": ingest_spec, "output_root": bucket_uri}
    settings = store.settings
    cache = tmp_path / "cache"
    first = run_pipeline(
        PIPELINES["ingest"], {**base, "data_version": "d2"}, tmp_path, settings, cache_root=cache
    )
    same = run_pipeline(
        PIPELINES["ingest"], {**base, "data_version": "d2"}, tmp_path, settings, cache_root=cache
    )
    bumped = run_pipeline(
        PIPELINES["ingest"], {**base, "data_version": "d3"}, tmp_path, settings, cache_root=cache
    )
    assert first.executed == ["ingest"]
    assert same.executed == []
    assert bumped.executed == ["ingest"]
    assert bumped.result("ingest")["output_uri"] != first.result("ingest")["output_uri"]


def _launcher_args(bucket_uri: str) -> dict:
    spec = {
        "manifest_uri": f"{bucket_uri}/in/manifest.parquet",
        "method": "dinov2",
        "backbone": "vit_mini_p7_28",
        "steps": 1,
        "batch_size": 8,
    }
    return {"spec_json": json.dumps(spec), "output_root": bucket_uri, "data_version": "m1", "nodes": 2}


def test_multi_node_pretrain_runs_its_cpu_launcher_which_submits_a_trainjob(
    store, bucket_uri, tmp_path, monkeypatch, capfd
):
    """nodes=2 takes the launcher branch in kfp.local: it builds the 2-node job and goes to the
    Kubernetes API, which this machine does not have (the lifecycle is tested in test_trainjob)."""
    from dinoflow.errors import DinoflowError
    from dinoflow.pipelines.stages import PIPELINES

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    with pytest.raises(DinoflowError, match="failed"):
        run_pipeline(PIPELINES["pretrain"], _launcher_args(bucket_uri), tmp_path, store.settings)
    out = capfd.readouterr()
    assert "no Kubernetes access" in out.out + out.err


def test_multi_node_launcher_returns_the_result_its_job_recorded(store, bucket_uri, tmp_path):
    """When the job's output is complete (a retry after the job finished), the launcher returns the
    recorded result without submitting anything; dsl.OneOf hands it on as the step's result."""
    from dinoflow.kfp.runtime import output_uri_for
    from dinoflow.pipelines.stages import PIPELINES

    args = _launcher_args(bucket_uri)
    spec = {"nproc": 1, "nnodes": 2, **json.loads(args["spec_json"])}  # gpus=1 -> nproc, nodes -> nnodes
    out = output_uri_for(bucket_uri, "m1", "pretrain", spec)
    recorded = {"output_uri": out, "backbone_uri": f"{out}/backbone", "steps": 1}
    store.write_success(out, {"spec_hash": "x", "result": recorded})
    run = run_pipeline(PIPELINES["pretrain"], args, tmp_path, store.settings)
    assert run.executed == ["pretrain"]
    assert run.result("pretrain") == recorded
