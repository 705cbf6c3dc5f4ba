"""curate: retrieval of pool images similar to curated seed sets (DINOv2 Sec. 3), or hierarchical
k-means balanced sampling (the ssl-data-curation method used for DINOv3's data).

Strategies: ``retrieval`` (top-N pool neighbours per seed image; DINOv2 used N=4 for large seed
sets), ``cluster`` (k-means on the pool, sample from clusters holding seed images; DINOv2's choice
for small seed sets), ``hierarchical-kmeans`` (no seeds: balanced top-down sampling over a cluster
hierarchy). Outputs: ``manifest.parquet`` (curated rows, same shards), ``embeddings/``,
``report.json`` (per-source counts, strategy details).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages.base import StageResult, StageSpec

log = logging.getLogger(__name__)


class CurateSpec(StageSpec):
    manifest_uri: str = Field(..., description="pool manifest (usually the dedup stage's kept manifest)")
    embeddings_uri: str = Field(..., description="the pool's embeddings, row-aligned")
    seed_manifest_uris: list[str] = Field(default_factory=list, description="curated seed sets (queries)")
    seed_embeddings_uris: list[str] = Field(default_factory=list, description="their embeddings, same order")
    strategy: Literal["retrieval", "cluster", "hierarchical-kmeans", "all"] = Field(
        "retrieval", description="all: keep the whole pool (a retrain adding deduplicated new images)"
    )
    target_size: int = Field(0, ge=0, description="images in the curated manifest (strategy all: unused)")
    keep_seeds: bool = Field(
        False,
        description="the curated manifest starts with the seed sets' rows: a retrain grows the set it "
        "already curated by what it selects from the new pool",
    )
    n_per_query: int | None = Field(
        None,
        ge=1,
        description="retrieval: neighbours per seed (DINOv2: 4; 32 for ImageNet-1k); "
        "default ceil(target_size / seeds), doubled until target_size is reached",
    )
    n_clusters: int | None = Field(None, ge=2, description="cluster: k-means clusters on the pool")
    clusters_per_level: list[int] = Field(
        default_factory=list,
        description="hierarchical-kmeans: clusters per level, decreasing "
        "(default 4 levels scaled to the pool, as in ssl-data-curation's 4-level setup)",
    )
    resample_steps: int = Field(2, ge=0, description="hierarchical-kmeans: resampling rounds per level")
    resample_points: int = Field(
        10, ge=1, description="hierarchical-kmeans: points kept per cluster per round"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> CurateSpec:
        if len(self.seed_manifest_uris) != len(self.seed_embeddings_uris):
            raise ValueError("seed_manifest_uris and seed_embeddings_uris must pair up one to one")
        if self.strategy in ("retrieval", "cluster") and not self.seed_manifest_uris:
            raise ValueError(f"strategy '{self.strategy}' needs at least one seed set")
        if self.strategy != "all" and self.target_size < 1:
            raise ValueError(f"strategy '{self.strategy}' needs target_size")
        if self.keep_seeds and not self.seed_manifest_uris:
            raise ValueError("keep_seeds needs at least one seed set")
        return self


class CurateResult(StageResult):
    manifest_uri: str
    embeddings_uri: str | None = None
    report_uri: str
    count: int
    per_source: dict[str, int] = Field(default_factory=dict)


def default_levels(n: int) -> list[int]:
    """4 levels, each ~1/4 to 1/5 of the one below, the first ~n/20 clusters."""
    k1 = max(8, min(n // 20, 4096))
    levels = [k1]
    for _ in range(3):
        nxt = max(2, levels[-1] // 5)
        if nxt >= levels[-1]:
            break
        levels.append(nxt)
    return levels


def check_inputs(spec: CurateSpec, store):
    """The pool table, its embedding metadata, the seed embeddings' URIs and the k-means levels,
    all checked before any heavy work."""
    from dinoflow.data.embeddings import read_meta
    from dinoflow.data.manifest import read_manifest

    table = read_manifest(store, spec.manifest_uri)
    n = table.num_rows
    if n == 0:
        raise SpecError(f"curate: pool manifest {spec.manifest_uri} is empty")
    meta = read_meta(store, spec.embeddings_uri)
    if meta["count"] != n:
        raise SpecError(
            f"curate: embeddings {spec.embeddings_uri} hold {meta['count']} rows, manifest has {n}"
        )
    if spec.target_size > n:
        raise SpecError(f"curate: target_size={spec.target_size} is larger than the pool ({n} images)")
    seed_parts = []
    for mu, eu in zip(spec.seed_manifest_uris, spec.seed_embeddings_uris, strict=True):
        sm = read_meta(store, eu)
        if sm["dim"] != meta["dim"]:
            raise SpecError(f"curate: seed embeddings {eu} are {sm['dim']}-d, the pool's {meta['dim']}-d")
        if read_manifest(store, mu).num_rows != sm["count"]:
            raise SpecError(f"curate: seed embeddings {eu} do not match seed manifest {mu}")
        seed_parts.append(eu)
    levels = spec.clusters_per_level or default_levels(n)
    if spec.strategy == "hierarchical-kmeans" and levels[0] > n:
        raise SpecError(f"curate: level-1 k={levels[0]} is larger than the pool ({n} images)")
    if spec.strategy == "cluster" and spec.n_clusters and spec.n_clusters > n:
        raise SpecError(f"curate: n_clusters={spec.n_clusters} is larger than the pool ({n} images)")
    return table, meta, seed_parts, levels


def select_rows(spec: CurateSpec, pool, seeds, levels: list[int]):
    """Sorted pool rows chosen by ``spec.strategy``, and details for the report."""
    import numpy as np

    from dinoflow.curation.hkmeans import balanced_sample, hierarchical_kmeans
    from dinoflow.curation.retrieval import cluster_sample, retrieve_topn

    details: dict = {"strategy": spec.strategy}
    if spec.strategy == "all":  # a retrain keeps every new image that survived dedup
        return np.arange(len(pool), dtype=np.int64), details
    if spec.strategy == "retrieval":
        rows, sims, k = retrieve_topn(pool, seeds, spec.target_size, n_per_query=spec.n_per_query)
        details.update(n_per_query=k, seeds=len(seeds), min_cos=float(sims.min()) if len(sims) else None)
    elif spec.strategy == "cluster":
        rows, info = cluster_sample(pool, seeds, spec.target_size, n_clusters=spec.n_clusters, seed=spec.seed)
        details.update(info, seeds=len(seeds))
    else:
        h = hierarchical_kmeans(
            pool,
            levels,
            resample_steps=spec.resample_steps,
            resample_points=spec.resample_points,
            seed=spec.seed,
        )
        rows = balanced_sample(h, spec.target_size, seed=spec.seed)
        details.update(clusters_per_level=levels)
    rows = np.sort(np.asarray(rows, np.int64))
    if len(rows) < spec.target_size:
        log.warning(
            "curate: %s found %d images, fewer than target_size=%d",
            spec.strategy,
            len(rows),
            spec.target_size,
        )
    return rows, details


def run(spec: CurateSpec, store):
    import numpy as np
    import pyarrow as pa

    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.data.embeddings import read_embeddings, write_embeddings
    from dinoflow.data.manifest import write_manifest
    from dinoflow.metrics import IMAGES_PROCESSED

    table, meta, seed_parts, levels = check_inputs(spec, store)
    n = table.num_rows
    raw, _ = read_embeddings(store, spec.embeddings_uri)
    pool = l2_normalize(raw)
    seeds = (
        l2_normalize(np.concatenate([read_embeddings(store, u)[0] for u in seed_parts]))
        if seed_parts
        else None
    )
    rows, details = select_rows(spec, pool, seeds, levels)
    curated = table.take(pa.array(rows))
    if spec.keep_seeds:  # the curated set so far, then what this run adds (re-embedded by the next run)
        from dinoflow.data.manifest import read_manifest

        old = [read_manifest(store, u) for u in spec.seed_manifest_uris]
        curated = pa.concat_tables([*old, curated], promote_options="default")
        details.update(kept_seed_rows=sum(t.num_rows for t in old))
    manifest_uri = spec.out("manifest.parquet")
    write_manifest(store, manifest_uri, curated)
    emb_out = spec.out("embeddings")
    write_embeddings(
        store,
        emb_out,
        raw[rows],
        meta={
            "manifest_uri": manifest_uri,
            "parent": spec.embeddings_uri,
            "backbone_uri": meta.get("backbone_uri"),
        },
    )
    src = curated.column("source").to_pylist()
    per_source = {s: src.count(s) for s in sorted(set(src))}
    pool_src = table.column("source").to_pylist()
    report = {
        **details,
        "count": curated.num_rows,
        "target_size": spec.target_size,
        "per_source": per_source,
        "pool_per_source": {s: pool_src.count(s) for s in sorted(set(pool_src))},
    }
    report_uri = spec.out("report.json")
    store.put_json(report_uri, report)
    IMAGES_PROCESSED.labels("curate").inc(n)
    return CurateResult(
        output_uri=spec.output_uri,
        manifest_uri=manifest_uri,
        embeddings_uri=None if spec.keep_seeds else emb_out,  # embeddings of the added rows only
        report_uri=report_uri,
        count=curated.num_rows,
        per_source=per_source,
    )
