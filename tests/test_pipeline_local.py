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
    "evaluate-teacher",
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
    # the teacher is scored on the same sets under its own name; promote ships the student
    teacher = run.result("evaluate-teacher")
    assert teacher["backbone_uri"] == run.result("pretrain")["backbone_uri"] != ev["backbone_uri"]
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


# -- the scheduled retrain, three times after the full run: new images, new images, nothing new ------
def _drop_images(store, root: str, rows, copies_of=()) -> list[str]:
    """Fashion-MNIST train images ``rows`` as PNG files under ``root/train/<label>/``, plus exact
    copies (new names, same bytes) of the objects ``copies_of``; returns the URIs written."""
    import io

    from PIL import Image

    from dinoflow.data.idx import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    out = []
    for i in rows:
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, "PNG")
        uri = f"{root}/train/{int(labels[i])}/{i:05d}.png"
        store.put_bytes(uri, buf.getvalue())
        out.append(uri)
    for j, src in enumerate(copies_of):
        uri = f"{root}/train/{src.split('/')[-2]}/copy-{j}.png"
        store.put_bytes(uri, store.get_bytes(src))
        out.append(uri)
    return out


def _retrain_args(full_args: dict, source_uri: str) -> dict:
    keep = ("embed_spec", "pretrain_spec", "evaluate_spec", "promote_spec")
    dedup = {**json.loads(full_args["dedup_spec"]), "copy_detection": {"enabled": False}}  # hashes only
    return {
        **{k: full_args[k] for k in keep},
        "dedup_spec": json.dumps(dedup),
        "output_root": full_args["output_root"],
        "registry_uri": full_args["registry_uri"],
        "model_name": full_args["model_name"],
        "source_uri": source_uri,
    }


@pytest.fixture(scope="module")
def retrains(full_run):
    """Three retrain runs through kfp.local on what the full run published."""
    from dinoflow.pipelines.retrain import retrain

    store, args = full_run["store"], full_run["args"]
    incoming = f"{args['output_root'].rsplit('/', 1)[0]}/raw/incoming"
    curated_before = store.get_json(f"{args['output_root']}/curated.json")
    first = _drop_images(store, incoming, range(1000, 1040))
    runs = [run_pipeline(retrain, _retrain_args(args, incoming), full_run["root"], store.settings)]
    second = _drop_images(store, incoming, range(1040, 1070), copies_of=first[:5])
    runs.append(run_pipeline(retrain, _retrain_args(args, incoming), full_run["root"], store.settings))
    runs.append(run_pipeline(retrain, _retrain_args(args, incoming), full_run["root"], store.settings))
    return {"runs": runs, "drops": [first, second], "curated_before": curated_before}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_retrain_trains_the_champion_on_the_curated_set_grown_by_its_new_images(full_run, retrains):
    from dinoflow.data.manifest import read_manifest

    store = full_run["store"]
    r1, r2, _ = retrains["runs"]
    first, second = retrains["drops"]
    prev = retrains["curated_before"]["count"]
    for run, dropped in ((r1, first), (r2, second)):
        assert set(run.executed) == {
            "ingest",
            "embed-new",
            "embed-curated",
            "embed-eval",
            "dedup",
            "curate",
            "pretrain",
            "evaluate",
            "promote",
        }
        ing, dd, cu, pt = (run.result(t) for t in ("ingest", "dedup", "curate", "pretrain"))
        assert ing["counts"] == {"train": len(dropped)}  # only the new images were ingested
        assert dd["input_count"] == len(dropped)
        assert cu["count"] == prev + dd["kept_count"]  # the curated set grows by what survived dedup
        assert pt["n_images"] == cu["count"]  # ...and is what the retrain trained on
        marker = store.read_success(pt["output_uri"])["spec"]
        assert marker["manifest_uri"] == cu["manifest_uri"]
        prev = cu["count"]
    # the second drop's exact copies of first-drop images were dropped against the curated set
    kept = set(read_manifest(store, r2.result("dedup")["manifest_uri"]).column("sha256").to_pylist())
    curated_r1 = set(read_manifest(store, r1.result("curate")["manifest_uri"]).column("sha256").to_pylist())
    assert not kept & curated_r1
    assert r2.result("dedup")["kept_count"] <= len(second) - 5
    # each run had its own data version, so nothing was a cache hit of the run before
    v1, v2 = (r.result("pretrain")["output_uri"].split("/")[-3] for r in (r1, r2))
    assert v1 != v2 and v1.startswith("t20")  # kfp.local: the creation time, as a one-off run gets


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_retrain_starts_from_the_champion_and_promotes_only_if_better(full_run, retrains):
    from dinoflow.stages.promote import read_decisions

    store, args = full_run["store"], full_run["args"]
    r1, r2, _ = retrains["runs"]
    decisions = read_decisions(store, args["registry_uri"], args["model_name"])
    assert len(decisions) == 3  # the full run's, then one per retrain that had new images
    full_d, d1, d2 = decisions
    assert full_d["promoted"] and full_d["champion_version"] is None
    for d, run in ((d1, r1), (d2, r2)):
        assert d["challenger_backbone_uri"] == run.result("pretrain")["backbone_uri"]
        assert d["promoted"] == (d["challenger_value"] > d["champion_value"] + d["margin"])
        assert run.result("promote")["promoted"] == d["promoted"]
    # each retrain continued from the champion of its time (the one the decision before it left)
    for d_before, run in ((full_d, r1), (d1, r2)):
        spec = store.read_success(run.result("pretrain")["output_uri"])["spec"]
        version = d_before["new_champion_version"]
        assert spec["init_backbone_uri"] == f"{args['registry_uri']}/{args['model_name']}/versions/{version}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_retrain_with_nothing_new_ends_after_ingest_and_says_so(full_run, retrains):
    store, args = full_run["store"], full_run["args"]
    r3 = retrains["runs"][2]
    assert r3.executed == ["ingest"]  # the rest of the run is a skipped branch; the run succeeded
    ing = r3.result("ingest")
    assert ing["counts"] == {} and ing["skipped_seen"] == sum(len(d) for d in retrains["drops"])
    curated = store.get_json(f"{args['output_root']}/curated.json")
    assert curated["output_uri"] == retrains["runs"][1].result("curate")["output_uri"]  # unchanged
