"""dinoflow bench dedup: dedup quality on a generated demo pool (default 100k images): precision
and recall of planted copies and of contamination, per transform type, against the ground truth."""

from __future__ import annotations

import argparse
import io
import json


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench dedup", description=__doc__)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument(
        "--prefix", default=None, help="s3:// prefix for the pool (default s3://bench-curation/pool-SIZE)"
    )
    ap.add_argument(
        "--embedder",
        choices=["pixel", "backbone"],
        default="pixel",
        help="pixel: training-free pixel descriptor; backbone: the embed stage with --backbone-uri",
    )
    ap.add_argument("--backbone-uri", default=None)
    ap.add_argument("--threshold-cos", type=float, default=0.9)
    ap.add_argument("--decontam-threshold-cos", type=float, default=0.9)
    ap.add_argument("--phash-max-bits", type=int, default=0)
    ap.add_argument("--k", type=int, default=64)
    a = ap.parse_args(argv)
    import pyarrow.parquet as pq

    from dinoflow.cli import _ensure_store
    from dinoflow.curation.pool import read_ground_truth
    from dinoflow.curation.scoring import score_dedup
    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage

    from ._pool import pool_and_embeddings

    store = _ensure_store()
    prefix = a.prefix or f"s3://bench-curation/pool-{a.size}"
    info = pool_and_embeddings(store, prefix, a.size, a.embedder, a.backbone_uri)
    stage = get_stage("dedup")
    tag = f"t{a.threshold_cos}-d{a.decontam_threshold_cos}-b{a.phash_max_bits}-k{a.k}"
    spec = stage.parse_spec(
        {
            "output_uri": f"{prefix}/dedup-{a.embedder}-{tag}",
            "manifest_uri": info["pool_manifest_uri"],
            "embeddings_uri": info["pool_emb"],
            "eval_manifest_uris": [info["eval_manifest_uri"]],
            "eval_embeddings_uris": [info["eval_emb"]],
            "threshold_cos": a.threshold_cos,
            "decontam_threshold_cos": a.decontam_threshold_cos,
            "phash_max_bits": a.phash_max_bits,
            "k": a.k,
        }
    )
    res = stage.run(spec, store)
    keys = read_manifest(store, info["pool_manifest_uri"]).column("key").to_pylist()
    kept = read_manifest(store, res.manifest_uri).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(res.groups_uri)))
    sc = score_dedup(read_ground_truth(store, info["ground_truth_uri"]), keys, kept, groups)
    print(f"pool {info['size']} images {info['per_source']}; dedup {res.seconds}s, index: {res.index_reason}")
    print(f"{'transform':<26}{'count':>7}{'recall':>8}")
    for t, v in sc["per_transform"].items():
        print(f"{t:<26}{v['count']:>7}{v.get('copy_recall', v.get('recall')):>8}")
    print(
        f"dup precision {sc['dup_precision']} recall {sc['dup_recall']}; contamination precision "
        f"{sc['contamination_precision']} recall {sc['contamination_recall']}"
    )
    print(
        json.dumps(
            {
                **sc,
                "pool_size": info["size"],
                "embedder": a.embedder,
                "dedup_seconds": res.seconds,
                "kept": res.kept_count,
                "removed_per_rule": res.removed_per_rule,
                "threshold_cos": a.threshold_cos,
                "decontam_threshold_cos": a.decontam_threshold_cos,
            }
        )
    )
