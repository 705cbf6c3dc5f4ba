"""dedup refuses to empty a pool through a degenerate embedder, and writes nothing when it does."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.data.embeddings import write_embeddings
from dinoflow.errors import SpecError
from dinoflow.stages import get_stage


def _pool(store, uri, tmp_path, n=24):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    ingest = get_stage("ingest")
    spec = ingest.parse_spec(
        {"output_uri": f"{uri}/pool", "kind": "folder", "splits": {"all": [str(tmp_path)]}, "source": "noise"}
    )
    return ingest.run(spec, store).manifests["all"]


def test_collapsed_embeddings_are_refused_with_nothing_written(store, bucket_uri, tmp_path):
    manifest = _pool(store, bucket_uri, tmp_path)
    collapsed = np.tile(np.eye(1, 8, dtype=np.float16), (24, 1))  # every image at the same point
    write_embeddings(store, f"{bucket_uri}/emb", collapsed, meta={"manifest_uri": manifest})
    dedup = get_stage("dedup")
    spec = dedup.parse_spec(
        {
            "output_uri": f"{bucket_uri}/dedup",
            "manifest_uri": manifest,
            "embeddings_uri": f"{bucket_uri}/emb",
            "k": 23,
        }
    )
    with pytest.raises(SpecError, match=r"would remove 23 of 24 pool images .*embedder does not separate"):
        dedup.run(spec, store)
    # no output (the run's _STARTED claim may stay: a rerun of this spec continues it)
    assert [u for u in store.list(f"{bucket_uri}/dedup/") if not u.endswith("/_STARTED")] == []
    # with well-spread embeddings the same pool passes untouched
    spread = np.linalg.qr(np.random.default_rng(1).normal(size=(32, 32)))[0][:24].astype(np.float16)
    write_embeddings(store, f"{bucket_uri}/emb2", spread, meta={"manifest_uri": manifest})
    res = dedup.run(
        dedup.parse_spec(
            {
                **spec.model_dump(),
                "output_uri": f"{bucket_uri}/dedup2",
                "embeddings_uri": f"{bucket_uri}/emb2",
            }
        ),
        store,
    )
    assert res.kept_count == 24
