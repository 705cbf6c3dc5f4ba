"""dinoflow bench dedup: dedup quality on a generated demo pool (default 100k images): precision
and recall of planted copies and of contamination, per transform type, against the ground truth.

The pool's base holds no unrecorded near-duplicate (dinoflow_tools.pool), so precision is
measured against a true ground truth. ``--sweep`` scores more threshold pairs on the same k-NN graph.
Default thresholds per embedder (DINOv2's 0.6/0.45 are for its copy-detection embedder, not ours):

* pixel (14 px correlation): 0.98 / 0.98. Most Fashion-MNIST images have a distinct neighbour
  above 0.9 at 14 px (and 80 % have an evaluation image above 0.9), so lower thresholds link
  distinct images and drop thousands of clean images as contamination (100k sweep: 0.95/0.95 gives
  dup precision 0.46, contamination precision 0.04; 0.98/0.98 gives 0.85 and 0.82). Crop, rotate
  and text copies fall far below and are missed: pixels are no copy detector.
* backbone (the bootstrap DINOv2: DEMO preset, 300 steps on 20k pool images; CLS, mean-centred):
  0.97 / 0.95, the best pair of the 100k sweep (dup precision 0.73, recall 0.52; contamination
  precision 0.32, recall 0.63). A short self-supervised run learns semantic similarity, not copy
  detection: at DINOv2's 0.6/0.45 it drops 99,979 of 100,000 images as contamination.


``--demo-pool-seed S`` runs the demo's own setting instead (``dinoflow.kfp.configs.DEMO_DEDUP``,
the embed stage's pixel embedder) on the demo pool generated with seed ``S`` (``dinoflow_tools.
demo_input``; seed 0 is the demo's, any other a validation pool whose planted copies differ), and
also reports the clean Fashion-MNIST images removed as contamination and every false removal's
rule (from ``groups.parquet``).
"""

from __future__ import annotations

import argparse
import io
import json

DEFAULTS = {"pixel": (0.98, 0.98), "backbone": (0.97, 0.95)}  # (threshold_cos, decontam_threshold_cos)
CENTER = {"pixel": False, "backbone": True}


def _sweep(spec, store, gt, keys, pairs):
    """Scores of several (threshold, decontam threshold) pairs on one similarity graph (its edges
    kept down to the lowest threshold of the sweep: a spec of its own, beside the run's)."""
    import numpy as np

    from dinoflow.curation.dedup import dedup
    from dinoflow.stages.dedup import load_inputs, similarity_graph
    from dinoflow_tools.scoring import ground_truth_arrays, score_outcome

    floor = min(t for t, _ in pairs)
    spec = spec.model_copy(update={"output_uri": f"{spec.output_uri}-sweep{floor}", "threshold_cos": floor})
    table, _, evals = load_inputs(spec, store)
    sim = similarity_graph(spec, store, table, evals)
    g = ground_truth_arrays(gt, keys)
    rows = []
    for t, d in pairs:
        edges = dict(sim.hash_edges)
        q, nb, _ = sim.graph.above(t)
        edges["embedding"] = (q, nb)
        hit = sim.touched_hash | (sim.eval_top1 > d)
        touched = np.flatnonzero(hit if sim.touched_copy is None else hit | sim.touched_copy)
        out = dedup(len(keys), edges, touched_eval=touched, grouping=spec.grouping)
        sc = score_outcome(g, out)
        rows.append(
            {
                "threshold_cos": t,
                "decontam_threshold_cos": d,
                **{
                    k: sc[k]
                    for k in (
                        "dup_precision",
                        "dup_recall",
                        "contamination_precision",
                        "contamination_recall",
                        "removed_as_duplicate",
                        "dropped_for_contamination",
                    )
                },
            }
        )
    return rows


def fashion_mnist_sets(store, prefix: str) -> dict:
    """Fashion-MNIST train (60k, the pool) and test (10k, the evaluation set) as manifests."""
    import numpy as np

    from dinoflow.data.idx import load_fashion_mnist
    from dinoflow_tools.pool import _write_set

    if store.exists(f"{prefix}/sets.json"):
        return store.get_json(f"{prefix}/sets.json")
    info = {}
    for name, split in (("pool", "train"), ("eval", "test")):
        x, y = load_fashion_mnist(split)
        info[f"{name}_manifest_uri"], _ = _write_set(
            store, f"{prefix}/{name}", x, ["fashion_mnist"] * len(x), np.asarray(y), split, 10_000
        )
    info["size"] = 60_000
    store.put_json(f"{prefix}/sets.json", info)
    return info


def demo_pool(a) -> None:
    """The demo's dedup (DEMO_DEDUP, pixel embed stage) on the demo pool of seed ``a.demo_pool_seed``."""
    import hashlib

    import faiss
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from dinoflow.data.manifest import read_manifest
    from dinoflow.kfp.configs import DEMO_DEDUP, DEMO_EMBED
    from dinoflow.stages import get_stage
    from dinoflow_tools.demo_input import DEMO_POOL
    from dinoflow_tools.pool import generate_pool, read_ground_truth
    from dinoflow_tools.scoring import ground_truth_arrays, outcome_arrays, score_arrays

    from ._store import bench_store

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    kw = {k: v for k, v in DEMO_POOL.items() if k != "size"}
    size = a.demo_pool_size or DEMO_POOL["size"]
    fields = dict(DEMO_DEDUP)
    for name in ("threshold_cos", "decontam_threshold_cos"):
        if getattr(a, name) is not None:
            fields[name] = getattr(a, name)
    if a.copy_detection == "off":
        fields["copy_detection"] = {"enabled": False}
    tag = json.dumps(fields, sort_keys=True)
    with bench_store() as store:
        prefix = f"s3://bench-curation/demo-pool-s{a.demo_pool_seed}-{size}"
        if a.fashion_mnist_train:
            prefix = "s3://bench-curation/fashion-mnist-train-test"
            info = fashion_mnist_sets(store, prefix)
        elif store.exists(f"{prefix}/pool.json"):
            info = store.get_json(f"{prefix}/pool.json")
        else:  # the demo's generator and arguments (its arrays cached locally by them)
            info = generate_pool(store, prefix, size, seed=a.demo_pool_seed, cache=True, **kw)
        embed = get_stage("embed")
        emb = {}
        for name in ("pool", "eval"):
            spec = {
                **DEMO_EMBED,
                "output_uri": f"{prefix}/emb-pixels/{name}",
                "manifest_uri": info[f"{name}_manifest_uri"],
            }
            emb[name] = embed.run(embed.parse_spec(spec), store).embeddings_uri
        stage = get_stage("dedup")
        spec = stage.parse_spec(
            {
                **fields,
                "output_uri": f"{prefix}/dedup-{hashlib.sha256(tag.encode()).hexdigest()[:10]}",
                "manifest_uri": info["pool_manifest_uri"],
                "embeddings_uri": emb["pool"],
                "eval_manifest_uris": [info["eval_manifest_uri"]],
                "eval_embeddings_uris": [emb["eval"]],
            }
        )
        res = stage.run(spec, store)
        report = store.get_json(res.report_uri)
        keys = read_manifest(store, info["pool_manifest_uri"]).column("key").to_pylist()
        kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
        groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
        if a.fashion_mnist_train:  # no ground truth: the share removed, and the pairs to look at
            c = [r for r in groups.to_pylist() if r["reason"] == "contamination"]
            for r in c[: a.list_pairs]:
                print(
                    "pair",
                    json.dumps({k: r[k] for k in ("key", "contamination_rule", "eval_key", "touched_by")}),
                )
            print(
                json.dumps(
                    {
                        "pool": "fashion_mnist_train",
                        "eval": "fashion_mnist_test",
                        "dedup_spec": fields,
                        "train_images": len(keys),
                        "removed_as_contamination": len(c),
                        "removed_as_contamination_fraction": round(len(c) / len(keys), 5),
                        "contamination_per_rule": report["contamination_per_rule"],
                        "removed_as_duplicate": len(keys) - len(kept) - len(c),
                        "copy_detection": report["copy_detection"],
                        "dedup_seconds": res.seconds,
                    }
                )
            )
            return
        g = ground_truth_arrays(read_ground_truth(store, info["ground_truth_uri"]), keys)
    o = outcome_arrays(keys, kept, groups)
    sc = score_arrays(
        g["copy_of"], g["transform"], g["contam"], g["source"], o["kept"], o["group"], o["reason"], o["rep"]
    )
    rule = dict(
        zip(groups.column("key").to_pylist(), groups.column("contamination_rule").to_pylist(), strict=True)
    )
    dropped = o["reason"] == "contamination"
    false = dropped & ~g["contam"]
    clean_fm = (g["source"] == "fashion_mnist") & ~g["contam"] & (g["copy_of"] < 0)
    false_rules = [rule[keys[i]] for i in np.flatnonzero(false)]
    print(
        f"demo pool seed {a.demo_pool_seed}: {info['size']} images {info['per_source']}; dedup {res.seconds}s"
    )
    print(f"{'transform':<26}{'count':>7}{'recall':>8}")
    for t, v in sc["per_transform"].items():
        print(f"{t:<26}{v['count']:>7}{v.get('copy_recall', v.get('recall')):>8}")
    print(
        json.dumps(
            {
                "demo_pool_seed": a.demo_pool_seed,
                "pool_size": info["size"],
                "dedup_spec": fields,
                "contamination_recall": sc["contamination_recall"],
                "contamination_precision": sc["contamination_precision"],
                "dropped_for_contamination": sc["dropped_for_contamination"],
                "planted_contamination": sc["planted_contamination"],
                "false_contamination": int(false.sum()),
                "false_contamination_per_rule": {r: false_rules.count(r) for r in sorted(set(false_rules))},
                "false_contamination_planted_duplicates": int((false & (g["copy_of"] >= 0)).sum()),
                "clean_fashion_mnist": int(clean_fm.sum()),
                "clean_fashion_mnist_removed_as_contamination": int((false & clean_fm).sum()),
                "clean_fashion_mnist_removed_fraction": round(
                    float((false & clean_fm).sum() / max(1, clean_fm.sum())), 5
                ),
                "contamination_per_rule": report["contamination_per_rule"],
                "dup_precision": sc["dup_precision"],
                "dup_recall": sc["dup_recall"],
                "contamination_recall_per_transform": {
                    k.split(":")[1]: v["recall"]
                    for k, v in sc["per_transform"].items()
                    if k.startswith("contamination:")
                },
                "copy_detection": report["copy_detection"],
                "dedup_seconds": res.seconds,
            }
        )
    )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench dedup", description=__doc__)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument(
        "--prefix", default=None, help="s3:// prefix for the pool (default s3://bench-curation/pool-v2-SIZE)"
    )
    ap.add_argument(
        "--embedder",
        choices=["pixel", "backbone"],
        default="pixel",
        help="pixel: training-free pixel descriptor; backbone: the embed stage with --backbone-uri, or "
        "without it one bootstrap pretrain (DEMO preset) on a sample of the pool",
    )
    ap.add_argument("--backbone-uri", default=None)
    ap.add_argument("--bootstrap-steps", type=int, default=300)
    ap.add_argument("--bootstrap-sample", type=int, default=20_000)
    ap.add_argument("--threshold-cos", type=float, default=None, help="default per embedder (module doc)")
    ap.add_argument("--decontam-threshold-cos", type=float, default=None)
    ap.add_argument("--center", choices=["auto", "yes", "no"], default="auto", help="auto: yes for backbone")
    ap.add_argument("--grouping", choices=["star", "connected"], default="star")
    ap.add_argument("--phash-max-bits", type=int, default=0)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument(
        "--copy-detection", choices=["on", "off"], default="on", help="the dedup spec's pixel copy detection"
    )
    ap.add_argument("--sweep", default="", help="extra pairs to score, e.g. 0.9:0.9,0.95:0.9")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--demo-pool-seed",
        type=int,
        default=None,
        help="the demo's dedup setting on the demo pool of this seed (0: the demo's own; see the module doc)",
    )
    ap.add_argument(
        "--demo-pool-size", type=int, default=None, help="with --demo-pool-seed (default: the demo's)"
    )
    ap.add_argument(
        "--fashion-mnist-train",
        action="store_true",
        help="the demo's setting on Fashion-MNIST train (pool) against test alone: the share removed as contamination",
    )
    ap.add_argument("--list-pairs", type=int, default=20, help="with --fashion-mnist-train: removals printed")
    a = ap.parse_args(argv)
    if a.demo_pool_seed is not None or a.fashion_mnist_train:
        demo_pool(a)
        return
    import faiss
    import pyarrow.parquet as pq
    import torch

    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import score_dedup

    from ._pool import default_prefix, pool_and_embeddings
    from ._store import bench_store

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    t_def, d_def = DEFAULTS[a.embedder]
    thr = a.threshold_cos if a.threshold_cos is not None else t_def
    dthr = a.decontam_threshold_cos if a.decontam_threshold_cos is not None else d_def
    center = CENTER[a.embedder] if a.center == "auto" else a.center == "yes"
    with bench_store() as store:
        prefix = a.prefix or default_prefix(a.size)
        info = pool_and_embeddings(
            store,
            prefix,
            a.size,
            a.embedder,
            a.backbone_uri,
            bootstrap_steps=a.bootstrap_steps,
            bootstrap_sample=a.bootstrap_sample,
        )
        stage = get_stage("dedup")
        tag = f"t{thr}-d{dthr}-b{a.phash_max_bits}-k{a.k}-c{int(center)}-{a.grouping}-cd{a.copy_detection}"
        emb_tag = info["pool_emb"].rstrip("/").split("/")[-3]
        spec = stage.parse_spec(
            {
                "output_uri": f"{prefix}/dedup-{emb_tag}-{tag}",
                "manifest_uri": info["pool_manifest_uri"],
                "embeddings_uri": info["pool_emb"],
                "eval_manifest_uris": [info["eval_manifest_uri"]],
                "eval_embeddings_uris": [info["eval_emb"]],
                "threshold_cos": thr,
                "decontam_threshold_cos": dthr,
                "phash_max_bits": a.phash_max_bits,
                "k": a.k,
                "center": center,
                "grouping": a.grouping,
                "copy_detection": {"enabled": a.copy_detection == "on"},
            }
        )
        res = stage.run(spec, store)
        copy_report = store.get_json(res.report_uri).get("copy_detection")
        keys = read_manifest(store, info["pool_manifest_uri"]).column("key").to_pylist()
        kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
        groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
        gt = read_ground_truth(store, info["ground_truth_uri"])
        sc = score_dedup(gt, keys, kept, groups)
        pairs = [tuple(float(v) for v in p.split(":")) for p in a.sweep.split(",") if p]
        sweep = _sweep(spec, store, gt, keys, pairs) if pairs else []
    print(f"pool {info['size']} images {info['per_source']}; dedup {res.seconds}s, index: {res.index_reason}")
    print(
        f"embedder {a.embedder} ({info.get('backbone_uri') or 'pixel descriptor'}), thresholds {thr}/{dthr}, center {center}"
    )
    print(f"{'transform':<26}{'count':>7}{'recall':>8}")
    for t, v in sc["per_transform"].items():
        print(f"{t:<26}{v['count']:>7}{v.get('copy_recall', v.get('recall')):>8}")
    print(
        f"dup precision {sc['dup_precision']} recall {sc['dup_recall']}; contamination precision "
        f"{sc['contamination_precision']} recall {sc['contamination_recall']}"
    )
    for r in sweep:
        print("sweep", json.dumps(r))
    print(
        json.dumps(
            {
                **sc,
                "pool_size": info["size"],
                "per_source": info["per_source"],
                "embedder": a.embedder,
                "backbone_uri": info.get("backbone_uri"),
                "pool_embed_seconds": info.get("pool_embed_seconds"),
                "dedup_seconds": res.seconds,
                "kept": res.kept_count,
                "removed_per_rule": res.removed_per_rule,
                "threshold_cos": thr,
                "decontam_threshold_cos": dthr,
                "center": center,
                "grouping": a.grouping,
                "copy_detection": copy_report,
                "sweep": sweep,
            }
        )
    )
