"""Shared by the dedup and curate benchmarks: a generated demo pool in the object store (made once
per prefix) and its embeddings, from the embed stage (a backbone, or one bootstrap pretrain on a
sample of the pool, shared by the pool, eval and seed sets) or from the training-free pixel
descriptor."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

POOL_VERSION = "v2"  # bump when the generator changes, so benches never reuse a stale pool
# A 100k pool needs more distinct base images than the offline sources hold at 8 % copies
# (68k distinct beside the 10k-image eval set, 70.5k beside a 2k one): 30 % planted copies fit.
BENCH_POOL = {"contamination": 1000, "eval_size": 2000, "dup_fraction": 0.3, "seed_size": 500}


def default_workers() -> int:
    """DataLoader workers that leave a core to the model: min(2, cpus - 1)."""
    return max(0, min(2, (os.cpu_count() or 1) - 1))


def default_prefix(size: int) -> str:
    return f"s3://bench-curation/pool-{POOL_VERSION}-{size}"


def pool_and_embeddings(
    store,
    prefix: str,
    size: int,
    embedder: str,
    backbone_uri: str | None,
    *,
    bootstrap_steps: int = 300,
    bootstrap_sample: int = 20_000,
) -> dict:
    from dinoflow.curation.descriptors import pixel_descriptor
    from dinoflow.curation.hashing import phash64, reduce_for_hash
    from dinoflow.data.dataset import load_images
    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.stages import get_stage
    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import generate_pool

    info_uri = join_uri(prefix, "pool.json")
    if store.exists(info_uri):
        info = store.get_json(info_uri)
    else:
        info = generate_pool(store, prefix, size, **BENCH_POOL)
    tag = "pixel" if embedder == "pixel" else ("bootstrap" if backbone_uri is None else "backbone")
    for name in ("pool", "eval", "seed"):
        out = join_uri(prefix, f"emb-{tag}", name)
        if embedder == "pixel":
            if not store.exists(join_uri(out, "embeddings.json")):
                x, _ = load_images(store, info[f"{name}_manifest_uri"], channels=1)
                x = x[:, 0].numpy()
                write_embeddings(store, out, pixel_descriptor(x), phash=phash64(reduce_for_hash(x)))
            info[f"{name}_emb"] = out
            continue
        stage = get_stage("embed")
        fields = {
            "output_uri": out,
            "manifest_uri": info[f"{name}_manifest_uri"],
            "backbone_uri": backbone_uri,
            "num_workers": default_workers(),
        }
        if backbone_uri is None:  # the pool's embed bootstraps one backbone; eval and seed reuse it
            fields |= {"bootstrap_steps": bootstrap_steps, "bootstrap_sample": bootstrap_sample}
        res = stage.run(stage.parse_spec(fields), store)
        info[f"{name}_embed_seconds"] = res.seconds  # the pool's includes the bootstrap pretrain
        backbone_uri = res.backbone_uri
        info[f"{name}_emb"] = res.embeddings_uri
    info["backbone_uri"] = backbone_uri
    return info
