"""``dinoflow demo``'s wiring at tiny sizes: the generated mixed pool goes through the full pipeline
(kfp.local, the real store), the teacher and the student are both evaluated, and the curation report
joins the pool's ground truth to what dedup and curate did."""

from __future__ import annotations

import json
import uuid

import pytest

from dinoflow.data.idx import fashion_mnist_paths
from dinoflow.demo import demo_tools, summarise
from dinoflow.kfp.configs import demo_arguments, tiny_arguments
from dinoflow.kfp.local import run_pipeline


@pytest.fixture(scope="module")
def demo_run(store, tmp_path_factory):
    from dinoflow.pipelines.full import full

    tools = demo_tools()
    root = f"s3://demo-{uuid.uuid4().hex[:10]}"
    pool = tools.write_demo_input(
        store, f"{root}/input", size=1500, seed_size=300, contamination=60, eval_size=500, dup_fraction=0.06
    )
    args = demo_arguments(fashion_mnist_paths(), f"{root}/runs", "t1", shards=pool["splits"])
    tiny = tiny_arguments(fashion_mnist_paths(), f"{root}/runs", "t1")
    args.update({k: tiny[k] for k in ("pretrain_spec", "distill_spec")})
    ev = json.loads(tiny["evaluate_spec"])
    args["evaluate_spec"] = json.dumps({**ev, "max_train_images": 2000})
    args["curate_spec"] = json.dumps({"strategy": "retrieval", "target_size": 600, "keep_seeds": True})
    out = tmp_path_factory.mktemp("demo-out")
    run = run_pipeline(full, args, out / "kfp", store.settings, caching=False)
    return {"run": run, "summary": summarise(run, out, store, tools, pool), "pool": pool}


def test_the_demo_pool_is_ingested_as_generated(demo_run):
    run, pool = demo_run["run"], demo_run["pool"]
    counts = run.result("ingest")["counts"]
    assert counts == {"train": 60000, "pool": pool["size"], "seed": 300, "test": 500}
    assert run.result("embed-pool")["backbone_uri"] == "pixels"  # training-free first generation
    assert run.result("embed-eval")["backbone_uri"] == "pixels"


def test_teacher_is_the_headline_and_the_student_has_its_row(demo_run):
    s = demo_run["summary"]
    run = demo_run["run"]
    assert s["teacher"]["backbone_uri"] == run.result("pretrain")["backbone_uri"]
    assert s["knn_top1"] == s["teacher"]["knn_top1"] is not None
    ((name, student),) = s["students"].items()
    assert (
        name == "vit_test_p4_28" and student["backbone_uri"] == run.result("distill")["backbone_uris"][name]
    )


def test_curation_report_accounts_for_every_pool_image(demo_run):
    rep, pool = demo_run["summary"]["curation"], demo_run["pool"]
    rows = rep["per_source"]
    assert sum(r["pool"] for r in rows.values()) == pool["size"]
    for r in rows.values():  # every image is kept or removed by exactly one rule
        assert r["kept"] + r["removed_duplicate"] + r["removed_contamination"] == r["pool"]
        assert r["retrieved"] <= r["kept"]
    assert rows["planted test copies"]["pool"] == 60
    assert rows["planted duplicates"]["pool"] == pool["planted_copies"]
    # pixel correlation + the pixel copy detection catch most planted test copies at tiny size too
    assert rep["contamination_recall"] >= 0.8 and rep["contamination_precision"] >= 0.8
    # every false contamination removal is listed with the rule that fired and the test image it matched
    false = sum(r["removed_contamination"] for k, r in rows.items() if k != "planted test copies")
    assert sum(rep["false_contamination_per_rule"].values()) == len(rep["false_contamination_pairs"]) == false
    assert set(rep["false_contamination_per_rule"]) <= {"exact", "phash", "cosine", "copy", "group"}
    assert all(p["eval_key"] for p in rep["false_contamination_pairs"])
    # retrieval around Fashion-MNIST seeds takes Fashion-MNIST above its share of the pool
    assert rep["retrieved_fashion_mnist_share"] > rep["pool_fashion_mnist_share"]
    text = demo_tools().format_report(rep)
    assert "planted test copies" in text and "contamination recall" in text


def test_the_pool_arrays_are_cached_by_their_arguments(tmp_path, monkeypatch):
    """The second demo reads the thinned pool from the local cache: the same arrays, no pickles."""
    import numpy as np

    from dinoflow_tools import pool as pool_mod

    monkeypatch.setattr(pool_mod, "_cache_path", lambda: tmp_path / "curation" / "sources.npz")
    monkeypatch.setattr(pool_mod, "other_sources", lambda: {"glyphs": pool_mod.glyph_images(limit=400)})
    kw = {"eval_size": 100, "seed_size": 50, "contamination": 10}
    first = pool_mod.cached_pool_arrays(300, **kw)
    (cached,) = (tmp_path / "curation").glob("pool-300-*.npz")
    calls = []
    build = pool_mod.build_pool_arrays
    monkeypatch.setattr(pool_mod, "build_pool_arrays", lambda *a, **k: calls.append(1))
    again = pool_mod.cached_pool_arrays(300, **kw)
    assert not calls
    for name in ("images", "copy_of", "contamination_of", "eval_images", "seed_labels", "eval_rows"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert list(again.source) == list(first.source) and list(again.transform) == list(first.transform)
    assert len(list((tmp_path / "curation").glob("pool-300-*.npz"))) == 1 and cached.exists()
    monkeypatch.setattr(pool_mod, "build_pool_arrays", build)
    pool_mod.cached_pool_arrays(300, **{**kw, "contamination": 5})  # other arguments: another file
    assert len(list((tmp_path / "curation").glob("pool-300-*.npz"))) == 2


def test_pretrain_steps_replaces_only_the_presets_step_count():
    """``dinoflow demo --pretrain-steps N`` (the README's frontier): the DEMO preset with N steps."""
    from dinoflow.train.presets import DEMO

    shards = {"pool": ["s3://b/pool-000000.tar"], "seed": [], "test": []}
    base = json.loads(
        demo_arguments(fashion_mnist_paths(), "s3://b/runs", "v", shards=shards)["pretrain_spec"]
    )
    longer = json.loads(
        demo_arguments(fashion_mnist_paths(), "s3://b/runs", "v", shards=shards, pretrain_steps=3600)[
            "pretrain_spec"
        ]
    )
    assert base["steps"] == DEMO["steps"] == 1800 and longer["steps"] == 3600
    assert {k: v for k, v in longer.items() if k != "steps"} == {
        k: v for k, v in base.items() if k != "steps"
    }


def test_demo_refuses_a_step_count_below_one():
    from typer.testing import CliRunner

    from dinoflow.cli import app

    res = CliRunner().invoke(app, ["demo", "--pretrain-steps", "0"])
    assert res.exit_code == 2 and "pretrain-steps" in res.output
