"""The curation subgraph (pipelines/curation.py) through kfp.local: with parallelism 1 and 3 the same
pipeline keeps and curates the same images, embed parts write the same embeddings, and every plan
and part ran as its own task."""

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from kfp import dsl

from dinoflow.components.ingest import ingest
from dinoflow.kfp.gpu import cpu_task
from dinoflow.pipelines.curation import curation

SECRET = "dinoflow-s3"


@dsl.pipeline(name="curation-fanout-test")
def curation_only(
    ingest_spec: str,
    embed_spec: str,
    dedup_spec: str,
    curate_spec: str,
    output_root: str,
    data_version: str,
    parallelism: int = 1,
):
    common = {"output_root": output_root, "data_version": data_version}
    manifest = cpu_task(ingest(spec_json=ingest_spec, **common), SECRET).outputs["result"]
    curation(
        embed_spec=embed_spec,
        dedup_spec=dedup_spec,
        curate_spec=curate_spec,
        secret=SECRET,
        gpu={"gpus": 1, "node_selector": {}, "tolerations": []},
        common=common,
        parallelism=parallelism,
        pool={"name": "embed-pool", "split": "train", "manifest": manifest},
        eval_set={"name": "embed-eval", "split": "test", "manifest": manifest},
        seed={"name": "embed-eval"},  # the evaluation set's embeddings seed retrieval too
        share_embedder=True,
    )


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """The same curation with parallelism 1 and 3 (one kfp.local cache: ingest runs once)."""
    import torch

    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.kfp.configs import tiny_arguments
    from dinoflow.kfp.local import run_pipeline
    from dinoflow.models import create_backbone, export_backbone

    root = f"s3://fanout-{uuid.uuid4().hex[:10]}"
    # an untrained ViT with its residual branches switched on (LayerScale 1): image-dependent random
    # features, which give the cosine rules real work (a 2-step bootstrap maps all images to one point)
    torch.manual_seed(0)
    bb = create_backbone("vit_test_p4_28")
    for name, p in bb.model.named_parameters():
        if name.endswith(".gamma"):
            p.data.fill_(1.0)
    export_backbone(store, f"{root}/embedder", bb)
    tiny = tiny_arguments(fashion_mnist_paths(), f"{root}/runs", data_version="f1")
    ingest_spec = json.loads(tiny["ingest_spec"])
    ingest_spec["limit_per_split"] = 200
    args = {
        "ingest_spec": json.dumps(ingest_spec),
        "embed_spec": json.dumps(
            {"backbone_uri": f"{root}/embedder", "batch_size": 16, "num_workers": 0, "device": "cpu"}
        ),
        "dedup_spec": json.dumps(
            # random features crowd together: only the closest few percent are linked
            {
                "k": 8,
                "threshold_cos": 0.995,
                "decontam_threshold_cos": 0.998,
                "center": True,
                "index": "ivf",
                "copy_detection": {"enabled": False},  # pixels, not partitions: tested in test_stage_curation
            }
        ),
        "curate_spec": json.dumps({"strategy": "retrieval", "target_size": 60, "exact_max_pool": 50}),
        "output_root": f"{root}/runs",
        "data_version": "f1",
    }
    pipeline_root = tmp_path_factory.mktemp("kfp-fanout")
    out = {}
    for p in (1, 3):
        out[p] = run_pipeline(curation_only, {**args, "parallelism": p}, pipeline_root, store.settings)
    return out


def _keys(store, uri):
    from dinoflow.data.manifest import read_manifest

    return read_manifest(store, uri).column("key").to_pylist()


def test_every_plan_and_part_runs_as_its_own_task(runs):
    for p, run in runs.items():
        assert set(run.executed) >= {"embed-pool", "embed-eval", "dedup", "curate"}
        want = {f"{t}:plan" for t in ("embed-pool", "embed-eval", "dedup", "curate")}
        want |= {f"{t}:part-{i}" for t in ("embed-pool", "embed-eval", "dedup", "curate") for i in range(p)}
        assert set(run.phases) == want, (p, run.phases)
        assert all(run.result(t)["parts"] == p for t in ("embed-pool", "dedup", "curate"))
    assert "ingest" not in runs[3].executed  # the second run's ingest is a cache hit


def test_parallelism_three_keeps_and_curates_what_parallelism_one_does(store, runs):
    from dinoflow.data.embeddings import read_embeddings, read_phash

    one, three = runs[1], runs[3]
    e1, m1 = read_embeddings(store, one.result("embed-pool")["embeddings_uri"], np.float16)
    e3, m3 = read_embeddings(store, three.result("embed-pool")["embeddings_uri"], np.float16)
    assert len(m3["shards"]) == 3 and len(m1["shards"]) == 1  # one shard per part
    assert np.array_equal(e1, e3) and len(e1) == 200
    assert np.array_equal(
        read_phash(store, one.result("embed-pool")["embeddings_uri"]),
        read_phash(store, three.result("embed-pool")["embeddings_uri"]),
    )
    d1, d3 = one.result("dedup"), three.result("dedup")
    assert d1["index_kind"] == "ivf" and 0 < d1["kept_count"] < d1["input_count"] == 200
    assert d1["removed_per_rule"]["embedding"] > 0 and d1["contaminated_count"] > 0
    assert _keys(store, d1["manifest_uri"]) == _keys(store, d3["manifest_uri"])
    groups = [pq.read_table(io.BytesIO(store.get_bytes(d["groups_uri"]))).to_pylist() for d in (d1, d3)]
    assert groups[0] == groups[1]
    c1, c3 = one.result("curate"), three.result("curate")
    assert c1["count"] == 60 and _keys(store, c1["manifest_uri"]) == _keys(store, c3["manifest_uri"])
