"""Shared by the dedup and curate benchmarks: a generated demo pool in the object store (made once
per prefix) and its embeddings, from the embed stage (a backbone, or the bootstrap path) or from
the training-free pixel descriptor."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def pool_and_embeddings(
    store,
    prefix: str,
    size: int,
    embedder: str,
    backbone_uri: str | None,
    contamination: int = 1000,
    eval_size: int = 10_000,
) -> dict:  # noqa: ANN001
    from dinoflow.curation.embeddings import pixel_descriptor, write_embeddings
    from dinoflow.curation.hashing import phash64, reduce_for_hash
    from dinoflow.curation.pool import generate_pool
    from dinoflow.data.dataset import load_images
    from dinoflow.stages import get_stage
    from dinoflow.storage.client import join_uri

    info_uri = join_uri(prefix, "pool.json")
    if store.exists(info_uri):
        info = store.get_json(info_uri)
    else:
        info = generate_pool(
            store, prefix, size, contamination=contamination, eval_size=eval_size, seed_size=500
        )
    for name in ("pool", "eval", "seed"):
        out = join_uri(prefix, f"emb-{embedder}", name)
        if embedder == "pixel":
            if not store.exists(join_uri(out, "embeddings.json")):
                x, _ = load_images(store, info[f"{name}_manifest_uri"], channels=1)
                x = x[:, 0].numpy()
                write_embeddings(store, out, pixel_descriptor(x), phash=phash64(reduce_for_hash(x)))
            info[f"{name}_emb"] = out
        else:
            stage = get_stage("embed")
            spec = stage.parse_spec(
                {
                    "output_uri": out,
                    "manifest_uri": info[f"{name}_manifest_uri"],
                    "backbone_uri": backbone_uri,
                    "num_workers": 2,
                }
            )
            info[f"{name}_emb"] = stage.run(spec, store).embeddings_uri
    return info
