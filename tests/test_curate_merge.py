"""The retrain's merge, on the real store: curate strategy 'all' with keep_seeds puts the curated set
so far first, then every new pool row (what survived dedup), in one manifest."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.data.embeddings import write_embeddings
from dinoflow.data.manifest import from_rows, read_manifest, write_manifest
from dinoflow.errors import SpecError
from dinoflow.stages import get_stage


def _set(store, prefix: str, source: str, n: int, seed: int) -> tuple[str, str]:
    rows = [
        {
            "key": f"{source}/train/{i:09d}",
            "shard": f"{prefix}/shard-000000.tar",
            "member": f"{i:09d}.png",
            "source": source,
            "label": -1,
            "width": 28,
            "height": 28,
            "sha256": f"{source}-{i}",
            "split": "train",
        }
        for i in range(n)
    ]
    write_manifest(store, f"{prefix}/manifest.parquet", from_rows(rows))
    emb = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float16)
    write_embeddings(store, f"{prefix}/emb", emb, meta={"manifest_uri": f"{prefix}/manifest.parquet"})
    return f"{prefix}/manifest.parquet", f"{prefix}/emb"


def test_all_with_keep_seeds_grows_the_curated_set(store, bucket_uri):
    curated_m, curated_e = _set(store, f"{bucket_uri}/curated", "fashion-mnist", 6, 0)
    new_m, new_e = _set(store, f"{bucket_uri}/new", "incoming", 4, 1)
    stage = get_stage("curate")
    spec = {
        "output_uri": f"{bucket_uri}/out",
        "manifest_uri": new_m,
        "embeddings_uri": new_e,
        "seed_manifest_uris": [curated_m],
        "seed_embeddings_uris": [curated_e],
        "strategy": "all",
        "keep_seeds": True,
    }
    res = stage.run(stage.parse_spec(spec), store)
    table = read_manifest(store, res.manifest_uri)
    assert res.count == table.num_rows == 10
    assert table.column("key").to_pylist() == [
        *read_manifest(store, curated_m).column("key").to_pylist(),
        *read_manifest(store, new_m).column("key").to_pylist(),
    ]
    assert res.per_source == {"fashion-mnist": 6, "incoming": 4}
    assert res.embeddings_uri is None  # the merged set is re-embedded by the next run's embedder
    with pytest.raises(SpecError, match="needs target_size"):
        stage.parse_spec({**spec, "strategy": "retrieval", "keep_seeds": False})
    with pytest.raises(SpecError, match="keep_seeds needs at least one seed set"):
        stage.parse_spec({**spec, "seed_manifest_uris": [], "seed_embeddings_uris": []})
