"""curate: retrieval of pool images similar to curated seed sets (DINOv2 Sec. 3), or hierarchical
k-means balanced sampling (the ssl-data-curation method used for DINOv3's data).

Strategies: ``retrieval`` (top-N pool neighbours per seed image; DINOv2 used N=4 for large seed
sets), ``cluster`` (k-means on the pool, sample from clusters holding seed images; DINOv2's choice
for small seed sets), ``hierarchical-kmeans`` (no seeds: balanced top-down sampling over a cluster
hierarchy). Outputs: ``manifest.parquet`` (curated rows, same shards), ``embeddings/``,
``report.json`` (per-source counts, strategy details).

Fan-out (``retrieval``, ``parts`` > 1; ``dinoflow.stages._fanout``, ``dinoflow.curation.partition``):
``plan`` chooses the index (exact, or IVF with one coarse quantizer trained on a pool sample, its
list count and ``nprobe`` tuned on the seeds for ``recall_target``); ``part`` i indexes its row range of the pool
and finds every seed's nearest rows in it; the stage merges the parts' neighbours per seed (the
same neighbours whatever ``parts`` is) and selects. ``cluster`` and ``hierarchical-kmeans`` run
in the stage task itself (k-means over the whole pool).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from dinoflow.errors import SpecError
from dinoflow.stages import _fanout
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
    parts: int = Field(1, ge=1, description="retrieval: pool partitions searched by parallel tasks")
    exact_max_pool: int = Field(100_000, ge=1, description="retrieval: largest pool searched exactly")
    nprobe: int | None = Field(
        None, ge=1, description="retrieval, IVF: lists probed (default: the fewest that reach recall_target)"
    )
    recall_target: float = Field(
        0.95,
        gt=0,
        le=1,
        description="retrieval, IVF: recall of the seeds' neighbours the chosen nprobe reaches",
    )

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
    parts: int = 1


SEARCH_SLACK = 4  # parts return 4x the first neighbours-per-seed: room for two doublings


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


def _seeds(store, seed_parts: list[str]):
    import numpy as np

    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.data.embeddings import read_embeddings

    if not seed_parts:
        return None
    return l2_normalize(np.concatenate([read_embeddings(store, u)[0] for u in seed_parts]))


def _search_k(spec: CurateSpec, n: int, n_seeds: int) -> int:
    """Neighbours per seed each part returns: the spec's n_per_query, else room for two doublings."""
    from dinoflow.curation.retrieval import first_n_per_query

    k0 = spec.n_per_query or first_n_per_query(spec.target_size, n_seeds, n)
    return min(n, k0 if spec.n_per_query else SEARCH_SLACK * k0)


def plan(spec: CurateSpec, store) -> dict:
    """Check the inputs; for retrieval over a large pool, train the shared coarse quantizer on a
    pool sample, its list count and nprobe tuned on the seeds (``plan/centroids.npy``)."""
    import numpy as np

    from dinoflow.curation import knn
    from dinoflow.curation import partition as pt
    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.data.embeddings import EmbeddingReader, put_npy

    table, meta, seed_parts, levels = check_inputs(spec, store)
    n, d = table.num_rows, int(meta["dim"])
    out = {"strategy": spec.strategy, "count": n, "dim": d, "levels": levels, "kind": "", "reason": ""}
    out.update(nlist=0, nprobe=0, tuning=[], search_k=0)
    if spec.strategy != "retrieval":
        return out
    seeds = _seeds(store, seed_parts)
    out["search_k"] = _search_k(spec, n, len(seeds))
    choice = knn.choose_index(n, d, exact_max_pool=spec.exact_max_pool, nprobe=spec.nprobe)
    out.update(kind=choice.kind, reason=choice.reason, nlist=choice.nlist)
    if choice.kind == "flat":
        return out
    reader = EmbeddingReader(store, spec.embeddings_uri, meta)

    def train(nlist: int, init=None):
        sample = pt.coarse_sample(n, nlist, seed=spec.seed)
        return pt.train_coarse(l2_normalize(reader.take(sample)), nlist, seed=spec.seed, init=init)

    if spec.nprobe is not None:
        nlist, nprobe, tuning, sweep = choice.nlist, spec.nprobe, [], []
        centroids = train(nlist)
    else:
        rng = np.random.default_rng(spec.seed)
        q = seeds[np.sort(rng.choice(len(seeds), min(1000, len(seeds)), replace=False))]
        t = pt.tune_ivf(
            n,
            q,
            lambda: ((lo, l2_normalize(b)) for lo, b in reader.blocks(65_536)),
            lambda ids: l2_normalize(reader.take(ids)),
            train,
            min(out["search_k"], 256),
            spec.recall_target,
            search_queries=len(seeds),
        )
        nlist, centroids, nprobe, tuning, sweep = t.nlist, t.centroids, t.nprobe, t.tuning, t.nlist_sweep
    put_npy(store, spec.out("plan", "centroids.npy"), centroids)
    out.update(nlist=int(nlist), nprobe=int(nprobe), tuning=tuning, nlist_sweep=sweep)
    out["reason"] = (
        f"{choice.reason.split('; nlist')[0]}; nlist={nlist} (tried {[r['nlist'] for r in sweep]}); "
        f"nprobe={nprobe} (tuned: {tuning})"
    )
    return out


def part_neighbours(spec: CurateSpec, store, part: int, planned: dict, seeds, k: int):
    """Every seed's ``k`` nearest rows within part ``part`` of the pool: (cosines, rows)."""
    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.curation.partition import PartitionIndex, part_range
    from dinoflow.data.embeddings import EmbeddingReader

    lo, hi = part_range(planned["count"], spec.parts, part)
    x = l2_normalize(EmbeddingReader(store, spec.embeddings_uri).rows(lo, hi))
    return PartitionIndex(x, lo, _fanout.coarse_plan(spec, store, planned)).search(seeds, k)


def search_part(spec: CurateSpec, store, part: int, planned: dict) -> dict:
    """Part ``part``: its rows' neighbours of every seed (``parts/part-NNNNN/{sims,ids}.npy``)."""
    from dinoflow.data.embeddings import put_npy

    if planned["strategy"] != "retrieval":
        return {"rows": 0}
    seeds = _seeds(store, spec.seed_embeddings_uris)
    s, i = part_neighbours(spec, store, part, planned, seeds, planned["search_k"])
    where = spec.out("parts", f"part-{part:05d}")
    put_npy(store, f"{where}/sims.npy", s)
    put_npy(store, f"{where}/ids.npy", i)
    return {"rows": int(len(s)), "neighbours": int(s.shape[1])}


def run_phase(spec: CurateSpec, store, phase: str, part: int = 0) -> dict:
    """One fan-out phase (``plan`` or ``part``), recorded under ``output_uri``."""
    return _fanout.run_phase("curate", spec, store, phase, part, plan, search_part)


def retrieve(spec: CurateSpec, store, planned: dict, seeds):
    """Retrieval over the merged parts: each seed's neighbours, doubled from ceil(target / seeds)
    until the union reaches target_size (beyond what the parts returned, the pool's partitions are
    searched again here, one at a time)."""
    from dinoflow.curation.partition import merge_topk
    from dinoflow.curation.retrieval import first_n_per_query, select_topn
    from dinoflow.data.embeddings import get_npy

    n, big_k = planned["count"], planned["search_k"]
    got = [
        (
            get_npy(store, spec.out("parts", f"part-{i:05d}", "sims.npy")),
            get_npy(store, spec.out("parts", f"part-{i:05d}", "ids.npy")),
        )
        for i in range(spec.parts)
    ]
    sims, ids = merge_topk(got, big_k)
    k = spec.n_per_query or first_n_per_query(spec.target_size, len(seeds), n)
    while True:
        k = min(k, n)
        if k > big_k:  # more than the parts returned: search again, one partition at a time
            big_k = min(n, 2 * k)
            log.info(
                "curate: more than %d neighbours per seed needed; searching the parts again for %d",
                k // 2,
                big_k,
            )
            sims, ids = merge_topk(
                [part_neighbours(spec, store, i, planned, seeds, big_k) for i in range(spec.parts)], big_k
            )
        rows, best, enough = select_topn(ids[:, :k], sims[:, :k], spec.target_size)
        if enough or k >= n or spec.n_per_query is not None:
            return rows, best, k
        k *= 2


def select_rows(spec: CurateSpec, store, pool, seeds, levels: list[int], planned: dict | None = None):
    """Sorted pool rows chosen by ``spec.strategy``, and details for the report. Retrieval merges the
    parts' neighbours (``planned``: the plan's record); the k-means strategies take the whole
    ``pool`` (L2-normalised)."""
    import numpy as np

    from dinoflow.curation.hkmeans import balanced_sample, hierarchical_kmeans
    from dinoflow.curation.retrieval import cluster_sample

    details: dict = {"strategy": spec.strategy}
    if spec.strategy == "all":  # a retrain keeps every new image that survived dedup
        return np.arange(planned["count"], dtype=np.int64), details
    if spec.strategy == "retrieval":
        rows, sims, k = retrieve(spec, store, planned, seeds)
        details.update(
            n_per_query=k,
            seeds=len(seeds),
            min_cos=float(sims.min()) if len(sims) else None,
            index={
                "kind": planned["kind"],
                "reason": planned["reason"],
                "nprobe": planned["nprobe"],
                "parts": spec.parts,
            },
        )
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
    import pyarrow as pa

    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.data.embeddings import EmbeddingReader, copy_rows, read_embeddings
    from dinoflow.data.manifest import write_manifest
    from dinoflow.metrics import IMAGES_PROCESSED

    table, meta, seed_parts, levels = check_inputs(spec, store)
    n = table.num_rows
    planned = run_phase(spec, store, "plan")
    for i in range(spec.parts):
        run_phase(spec, store, "part", i)
    seeds = _seeds(store, seed_parts)
    whole = spec.strategy in ("cluster", "hierarchical-kmeans")  # k-means over the whole pool
    pool = l2_normalize(read_embeddings(store, spec.embeddings_uri)[0]) if whole else None
    rows, details = select_rows(spec, store, pool, seeds, levels, planned)
    curated = table.take(pa.array(rows))
    if spec.keep_seeds:  # the curated set so far, then what this run adds (re-embedded by the next run)
        from dinoflow.data.manifest import read_manifest

        old = [read_manifest(store, u) for u in spec.seed_manifest_uris]
        curated = pa.concat_tables([*old, curated], promote_options="default")
        details.update(kept_seed_rows=sum(t.num_rows for t in old))
    manifest_uri = spec.out("manifest.parquet")
    write_manifest(store, manifest_uri, curated)
    emb_out = spec.out("embeddings")
    copy_rows(
        store,
        EmbeddingReader(store, spec.embeddings_uri, meta),
        rows,
        emb_out,
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
        parts=spec.parts,
    )
