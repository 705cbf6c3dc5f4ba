"""dinoflow bench curate: share of curated images that are Fashion-MNIST, per strategy, against the
pool's base rate, when seeded with held-out Fashion-MNIST images (demo pool, default 100k)."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench curate", description=__doc__)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--prefix", default=None)
    ap.add_argument("--embedder", choices=["pixel", "backbone"], default="pixel")
    ap.add_argument("--backbone-uri", default=None)
    ap.add_argument("--target", type=int, default=10_000, help="curated images per strategy")
    a = ap.parse_args(argv)
    from dinoflow.stages import get_stage

    from ._pool import default_prefix, pool_and_embeddings
    from ._store import bench_store

    with bench_store() as store:
        _run(a, store, get_stage, default_prefix, pool_and_embeddings)


def _run(a, store, get_stage, default_prefix, pool_and_embeddings) -> None:
    prefix = a.prefix or default_prefix(a.size)
    info = pool_and_embeddings(store, prefix, a.size, a.embedder, a.backbone_uri)
    base_rate = info["per_source"]["fashion_mnist"] / info["size"]
    stage = get_stage("curate")
    out = {}
    print(f"pool {info['size']} images, Fashion-MNIST base rate {base_rate:.3f}")
    for strategy in ("retrieval", "cluster", "hierarchical-kmeans"):
        spec = {
            "output_uri": f"{prefix}/curate-{a.embedder}-{strategy}-{a.target}",
            "manifest_uri": info["pool_manifest_uri"],
            "embeddings_uri": info["pool_emb"],
            "strategy": strategy,
            "target_size": a.target,
        }
        if strategy != "hierarchical-kmeans":
            spec |= {
                "seed_manifest_uris": [info["seed_manifest_uri"]],
                "seed_embeddings_uris": [info["seed_emb"]],
            }
        res = stage.run(stage.parse_spec(spec), store)
        share = res.per_source.get("fashion_mnist", 0) / max(1, res.count)
        out[strategy] = {
            "count": res.count,
            "fashion_share": round(share, 4),
            "per_source": res.per_source,
            "seconds": res.seconds,
        }
        print(f"{strategy:<22} {res.count:>7} curated, Fashion-MNIST share {share:.3f}  {res.per_source}")
    print(
        json.dumps(
            {
                "curation_precision": out["retrieval"]["fashion_share"],
                "base_rate": round(base_rate, 4),
                "cluster_precision": out["cluster"]["fashion_share"],
                "hkmeans_fashion_share": out["hierarchical-kmeans"]["fashion_share"],
                "embedder": a.embedder,
                "pool_size": info["size"],
                "strategies": out,
            }
        )
    )
