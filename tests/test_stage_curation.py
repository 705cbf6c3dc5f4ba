"""embed, dedup and curate stages against the real embedded S3 server, on a generated demo pool."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from dinoflow.errors import SpecError
from dinoflow.stages import get_stage


@pytest.fixture(scope="module")
def demo(store):
    """A 1,200-image demo pool with pixel-descriptor embeddings (no trained backbone needed)."""
    import uuid

    from dinoflow.curation.descriptors import pixel_descriptor
    from dinoflow.curation.hashing import phash64, reduce_for_hash
    from dinoflow.data.dataset import load_images
    from dinoflow.data.embeddings import write_embeddings
    from dinoflow_tools.pool import generate_pool

    root = f"s3://cur-{uuid.uuid4().hex[:10]}/demo"
    info = generate_pool(store, root, 1200, eval_size=400, seed_size=100, contamination=40)
    for name in ("pool", "eval", "seed"):
        x, _ = load_images(store, info[f"{name}_manifest_uri"], channels=1)
        x = x[:, 0].numpy()
        info[f"{name}_emb"] = f"{root}/{name}-emb"
        write_embeddings(store, info[f"{name}_emb"], pixel_descriptor(x), phash=phash64(reduce_for_hash(x)))
    return info


def _dedup_spec(demo, out, **kw):
    return {
        "output_uri": out,
        "manifest_uri": demo["pool_manifest_uri"],
        "embeddings_uri": demo["pool_emb"],
        "eval_manifest_uris": [demo["eval_manifest_uri"]],
        "eval_embeddings_uris": [demo["eval_emb"]],
        # pixel-correlation descriptors need a higher bar than DINOv2's 0.6/0.45 copy-detection
        # embeddings: Fashion-MNIST neighbours correlate > 0.9 (bench dedup, README)
        "threshold_cos": 0.97,
        "decontam_threshold_cos": 0.95,
        **kw,
    }


def test_pool_has_sources_and_ground_truth(store, demo):
    from dinoflow_tools.pool import read_ground_truth

    assert demo["size"] == 1200 and demo["planted_copies"] > 0 and demo["contamination"] == 40
    assert sum(v > 0 for v in demo["per_source"].values()) >= 4
    gt = read_ground_truth(store, demo["ground_truth_uri"])
    assert gt.num_rows == 1200 and set(gt.column("transform").to_pylist()) >= {
        "crop",
        "flip",
        "text",
        "exact",
    }


def test_dedup_finds_planted_copies_and_decontaminates(store, demo, bucket_uri):
    from dinoflow.data.manifest import read_manifest
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import score_dedup

    stage = get_stage("dedup")
    res = stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri)), store)
    assert res.index_kind == "flat" and "exact" in res.index_reason
    assert res.kept_count < res.input_count
    keys = read_manifest(store, demo["pool_manifest_uri"]).column("key").to_pylist()
    kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
    sc = score_dedup(read_ground_truth(store, demo["ground_truth_uri"]), keys, kept, groups)
    per = sc["per_transform"]
    for t in ("flip", "brightness", "jpeg"):  # pixel-preserving copies: all linked
        assert per[t]["copy_recall"] >= 0.9, (t, per[t])
    assert per["blur"]["copy_recall"] >= 0.6, per["blur"]  # a strong blur falls below 0.97
    # every planted test copy is removed: exact/flip/blur/brightness/jpeg by the embedding
    # threshold, crop/rotate/text by the pixel copy detection
    for t in ("exact", "crop", "flip", "rotate", "blur", "jpeg", "brightness", "text"):
        assert per[f"contamination:{t}"]["recall"] == 1.0, (t, per)
    assert sc["contamination_recall"] == 1.0 and sc["planted_contamination"] == 40, sc
    assert sc["dup_recall"] > 0.5 and sc["dup_precision"] > 0.8, sc
    # star groups do not chain: decontamination drops a few groups, not the pool's dense core (most
    # false drops come from the loose pixel threshold 0.95; copy detection adds only its copies)
    assert sc["dropped_for_contamination"] < 0.15 * 1200, sc
    report = store.get_json(res.report_uri)
    assert 15 <= report["copy_detection"]["copies"] <= 40, report["copy_detection"]
    # every contamination removal is listed with its rule and the evaluation image it matched
    truth = {r["key"]: r for r in read_ground_truth(store, demo["ground_truth_uri"]).to_pylist()}
    rows = {r["key"]: r for r in groups.to_pylist()}
    c = [r for r in rows.values() if r["reason"] == "contamination"]
    rules = ("exact", "phash", "cosine", "copy", "group")
    assert {r["contamination_rule"] for r in c} <= set(rules), c
    assert all(r["contamination_rule"] == "" for r in rows.values() if r["reason"] != "contamination")
    assert report["contamination_per_rule"] == {
        x: sum(r["contamination_rule"] == x for r in c) for x in rules
    }
    own = [r for r in c if r["contamination_rule"] != "group"]
    assert all(r["touched_by"] == r["key"] and r["eval_key"] for r in own)
    assert all(r["eval_manifest"] == demo["eval_manifest_uri"] for r in own)
    for r in c:  # dropped through a group member that touched an evaluation set itself
        if r["contamination_rule"] == "group":
            t = rows[r["touched_by"]]
            assert t["key"] != r["key"] and t["group"] == r["group"] and t["contamination_rule"] != "group"
            assert r["eval_key"] == t["eval_key"]
    # a planted test copy's listed match is the test image it copies (eval keys are test{row:07d})
    planted = [r for r in own if truth[r["key"]]["contamination_of"] >= 0]
    hits = [r["eval_key"] == f"test{truth[r['key']]['contamination_of']:07d}" for r in planted]
    assert len(planted) >= 35 and np.mean(hits) >= 0.95, planted
    assert all(r["contamination_rule"] == "exact" for r in planted if truth[r["key"]]["transform"] == "exact")
    assert all(-1 <= r["eval_cos"] <= 1.0001 for r in c)
    copies = [r for r in c if r["contamination_rule"] == "copy"]
    assert copies and all(r["copy_error"] <= 0.008 or r["copy_global_error"] <= 0.012 for r in copies)
    assert set(report["removed_per_rule"]) == {"exact", "phash", "embedding", "contamination"}
    assert sum(v["input"] for v in report["per_source"].values()) == 1200
    # idempotent: same spec returns the recorded result; another spec on the same prefix is refused
    assert stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri)), store).kept_count == res.kept_count
    with pytest.raises(SpecError, match="different spec"):
        stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri, k=8)), store)


def test_dedup_on_verified_copies_only_drops_each_copy_alone(store, demo, bucket_uri):
    """The demo's decontamination: no cosine or pHash rule, verified pixel copies dropped alone."""
    from dinoflow.data.manifest import read_manifest
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import score_dedup

    stage = get_stage("dedup")
    only = {"decontam_threshold_cos": 1.0, "phash_decontaminates": False, "contamination_spread": "self"}
    res = stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri, phash_max_bits=2, **only)), store)
    report = store.get_json(res.report_uri)
    per_rule = report["contamination_per_rule"]
    assert per_rule["cosine"] == per_rule["phash"] == per_rule["group"] == 0, per_rule
    assert per_rule["exact"] + per_rule["copy"] == res.contaminated_count
    keys = read_manifest(store, demo["pool_manifest_uri"]).column("key").to_pylist()
    kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
    sc = score_dedup(read_ground_truth(store, demo["ground_truth_uri"]), keys, kept, groups)
    # blur, JPEG and brightness copies are verified as global edits, the rest geometrically
    assert sc["contamination_recall"] == 1.0 and sc["contamination_precision"] >= 0.95, sc
    assert report["copy_detection"]["per_eval_set"][0]["copies_per_alignment"]["global"] > 0


def test_dedup_ivf_path_matches_exact(store, demo, bucket_uri):
    stage = get_stage("dedup")
    off = {"copy_detection": {"enabled": False}}  # the same pixel pass on both: not what is compared
    a = stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri + "/a", k=16, **off)), store)
    b = stage.run(
        stage.parse_spec(_dedup_spec(demo, bucket_uri + "/b", k=16, index="ivf", nprobe=8, **off)), store
    )
    assert b.index_kind == "ivf"
    assert abs(a.kept_count - b.kept_count) <= 0.02 * a.input_count


def test_dedup_refuses_contradicting_specs(store, demo, bucket_uri):
    from dinoflow.data.embeddings import write_embeddings

    stage = get_stage("dedup")
    with pytest.raises(SpecError, match="larger than k"):
        stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri + "/a", k=5000)), store)
    bad = bucket_uri + "-bad-emb"
    write_embeddings(store, bad, np.ones((400, 7), np.float32))
    with pytest.raises(SpecError, match="7-d"):
        stage.run(stage.parse_spec(_dedup_spec(demo, bucket_uri + "/b", eval_embeddings_uris=[bad])), store)
    with pytest.raises(SpecError, match="pair up"):
        stage.parse_spec(_dedup_spec(demo, bucket_uri, eval_embeddings_uris=[]))
    assert not any(u.endswith("_SUCCESS") for u in store.list(bucket_uri + "/"))


@pytest.mark.parametrize("strategy", ["retrieval", "cluster"])
def test_curate_with_fashion_seeds_returns_mostly_fashion(store, demo, bucket_uri, strategy):
    stage = get_stage("curate")
    spec = {
        "output_uri": bucket_uri,
        "manifest_uri": demo["pool_manifest_uri"],
        "embeddings_uri": demo["pool_emb"],
        "seed_manifest_uris": [demo["seed_manifest_uri"]],
        "seed_embeddings_uris": [demo["seed_emb"]],
        "strategy": strategy,
        "target_size": 200,
    }
    res = stage.run(stage.parse_spec(spec), store)
    base_rate = demo["per_source"]["fashion_mnist"] / demo["size"]
    share = res.per_source.get("fashion_mnist", 0) / max(1, res.count)
    # retrieval is sharp; cluster sampling takes whole seed-holding clusters, so it is looser
    assert base_rate < 0.5 and 100 <= res.count <= 200
    assert share > (0.8 if strategy == "retrieval" else base_rate + 0.2), (share, base_rate)


def test_curate_hierarchical_kmeans_and_refusals(store, demo, bucket_uri):
    stage = get_stage("curate")
    base = {
        "output_uri": bucket_uri,
        "manifest_uri": demo["pool_manifest_uri"],
        "embeddings_uri": demo["pool_emb"],
    }
    res = stage.run(stage.parse_spec({**base, "strategy": "hierarchical-kmeans", "target_size": 300}), store)
    assert res.count == 300 and len(res.per_source) >= 3
    with pytest.raises(SpecError, match="larger than the pool"):
        stage.run(
            stage.parse_spec(
                {
                    **base,
                    "output_uri": bucket_uri + "-x",
                    "strategy": "hierarchical-kmeans",
                    "target_size": 5000,
                }
            ),
            store,
        )
    with pytest.raises(SpecError, match="needs at least one seed"):
        stage.parse_spec({**base, "strategy": "retrieval", "target_size": 10})


def test_embed_stage_rows_aligned_and_normalised(store, demo, bucket_uri):
    import torch

    from dinoflow.data.embeddings import read_embeddings, read_phash
    from dinoflow.models import create_backbone, export_backbone

    torch.manual_seed(0)
    export_backbone(store, bucket_uri + "/bb", create_backbone("vit_test_p4_28"))
    stage = get_stage("embed")
    spec = {
        "output_uri": bucket_uri + "/emb",
        "manifest_uri": demo["eval_manifest_uri"],
        "backbone_uri": bucket_uri + "/bb",
        "num_workers": 2,
        "batch_size": 64,
        "features": "cls+patch",
    }
    res = stage.run(stage.parse_spec(spec), store)
    emb, meta = read_embeddings(store, res.embeddings_uri)
    assert emb.shape == (400, 64) and res.dim == 64 and meta["backbone_uri"] == bucket_uri + "/bb"
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    # row alignment: each row's pHash (PIL resize in workers) is within a few bits of the eval set's own
    # pHash (torch resize) row for row; a shifted row would differ by ~32 of 64 bits
    from dinoflow.curation.hashing import hamming

    bits = hamming(read_phash(store, res.embeddings_uri)[:, 0], read_phash(store, demo["eval_emb"])[:, 0])
    assert np.median(bits) <= 2 and (bits <= 10).mean() > 0.95
    with pytest.raises(SpecError, match="no exported backbone"):
        stage.run(
            stage.parse_spec(
                {**spec, "output_uri": bucket_uri + "/e2", "backbone_uri": bucket_uri + "/nope"}
            ),
            store,
        )


def test_embed_bootstraps_a_backbone_when_none_is_given(store, demo, bucket_uri, caplog):
    import logging

    from dinoflow.data.embeddings import read_embeddings

    stage = get_stage("embed")
    spec = {
        "output_uri": bucket_uri,
        "manifest_uri": demo["seed_manifest_uri"],
        "num_workers": 0,
        "bootstrap_sample": 32,
        "bootstrap_steps": 2,
    }
    with caplog.at_level(logging.WARNING, logger="dinoflow.stages.embed"):
        res = stage.run(stage.parse_spec(spec), store)
    assert "no backbone_uri given" in caplog.text
    assert res.bootstrapped and res.backbone_uri.startswith(bucket_uri + "/bootstrap/")
    assert store.exists(res.backbone_uri + "/backbone.json")
    emb, _ = read_embeddings(store, res.embeddings_uri)
    assert emb.shape == (100, res.dim) and np.isfinite(emb).all()


def test_embed_pixels_needs_no_model_and_equals_the_pixel_descriptor(store, demo, bucket_uri):
    """The training-free first-generation embedder: the stage's rows are the pixel descriptor of the
    stored images, row for row; a set embedded "with the same embedder" (backbone_uri "pixels", as
    the full pipeline shares the pool's) gets the same; a backbone beside it is refused."""
    from dinoflow.data.embeddings import read_embeddings

    stage = get_stage("embed")
    spec = {"output_uri": bucket_uri + "/px", "manifest_uri": demo["eval_manifest_uri"], "num_workers": 1}
    res = stage.run(stage.parse_spec({**spec, "embedder": "pixels"}), store)
    assert res.backbone_uri == "pixels" and not res.bootstrapped and res.dim == 14 * 14
    emb, _ = read_embeddings(store, res.embeddings_uri)
    ref, _ = read_embeddings(store, demo["eval_emb"])  # pixel_descriptor of the decoded images
    assert emb.shape == ref.shape == (400, 196)
    assert np.abs(emb.astype(np.float32) - ref.astype(np.float32)).max() < 2e-3
    shared = stage.run(
        stage.parse_spec({**spec, "output_uri": bucket_uri + "/px2", "backbone_uri": "pixels"}), store
    )
    assert np.array_equal(read_embeddings(store, shared.embeddings_uri)[0], emb)
    with pytest.raises(SpecError, match="uses no backbone"):
        stage.parse_spec({**spec, "embedder": "pixels", "backbone_uri": bucket_uri + "/bb"})


def test_dedup_margin_rank_keeps_an_image_near_many_eval_images_and_drops_a_copy(store, demo, bucket_uri):
    """decontam_margin_rank: the nearest-evaluation cosine less that of a farther evaluation image.
    Pool row 0 sits among four evaluation images (a plain product), pool row 1 near one (a copy):
    the plain cosine rule drops both, the margin only the copy."""
    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages.dedup import SimilarityGraph, eval_scores

    rng = np.random.default_rng(0)
    n_pool, n_eval, d = 1200, 400, 64
    pool = rng.standard_normal((n_pool, d)).astype(np.float32)
    ev = rng.standard_normal((n_eval, d)).astype(np.float32)
    u, v = np.eye(d, dtype=np.float32)[0], np.eye(d, dtype=np.float32)[1]
    for i in range(4):  # four evaluation images around u, the pool's row 0 among them
        ev[i] = u + 0.25 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    pool[0] = u + 0.25 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    ev[10], pool[1] = v, v + 0.3 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    root = f"{bucket_uri}/margin"
    write_embeddings(store, f"{root}/pool", pool)
    write_embeddings(store, f"{root}/eval", ev)
    stage = get_stage("dedup")
    keys = read_manifest(store, demo["pool_manifest_uri"]).column("key").to_pylist()

    def run(out, parts=1, **kw):
        spec = _dedup_spec(
            demo,
            f"{root}/{out}",
            embeddings_uri=f"{root}/pool",
            eval_embeddings_uris=[f"{root}/eval"],
            copy_detection={"enabled": False},
            phash_max_bits=-1,
            exact_hash=False,
            contamination_spread="self",
            threshold_cos=0.99,
            parts=parts,
            **kw,
        )
        res = stage.run(stage.parse_spec(spec), store)
        groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
        # the demo pool's exact copies of evaluation images go by their own rule
        return res, sorted(g["key"] for g in groups.to_pylist() if g["contamination_rule"] == "cosine")

    _, plain = run("plain", decontam_threshold_cos=0.9)
    assert plain == [keys[0], keys[1]]
    res, margin = run("margin", decontam_threshold_cos=0.3, decontam_margin_rank=2)
    assert margin == [keys[1]]
    _, margin2 = run("margin2", parts=2, decontam_threshold_cos=0.3, decontam_margin_rank=2)
    assert margin2 == margin
    report = store.get_json(res.report_uri)
    assert (
        report["thresholds"]["decontam_margin_rank"] == 2 and "3-th nearest" in report["decontamination_rule"]
    )
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri))).to_pylist()
    (row,) = [g for g in groups if g["key"] == keys[1]]
    assert row["contamination_rule"] == "cosine" and 0.3 < row["eval_score"] < row["eval_cos"] - 0.1
    # a graph holding fewer evaluation cosines than the rank asks for is refused, not misread
    spec = stage.parse_spec(_dedup_spec(demo, f"{root}/x", decontam_margin_rank=5))
    sim = SimilarityGraph(
        None, {}, np.zeros(3, np.float32), np.zeros(3, bool), None, eval_topk=np.zeros((3, 3))
    )
    with pytest.raises(SpecError, match="needs each pool image's 6 nearest"):
        eval_scores(spec, sim)
