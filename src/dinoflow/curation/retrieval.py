"""Retrieval-based curation with seed sets as queries (DINOv2 Sec. 3).

* ``retrieve_topn``: each seed image takes its N nearest pool images (DINOv2: N=4 for large seed
  sets, 32 for ImageNet-1k); the union is ranked by best cosine and cut to the requested size.
* ``cluster_sample``: for small seed sets, k-means the pool and sample from the clusters that hold
  seed images (DINOv2 used 100k clusters on 1.2B images; here the count scales with the pool).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from dinoflow.curation.knn import knn_search

log = logging.getLogger(__name__)


def spherical_kmeans(
    x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init: np.ndarray | None = None
):
    """faiss k-means on L2-normalised rows (centroids re-normalised); returns (centroids, assignment)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= {len(x)} points, got k={k}")
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        max_points_per_centroid=256,
        min_points_per_centroid=1,
    )  # faiss default cap: 256 per centroid
    if init is not None:
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    else:
        km.train(x)
    _, assign = km.index.search(x, 1)
    return km.centroids.copy(), assign[:, 0].astype(np.int64)


def retrieve_topn(
    pool: np.ndarray, seeds: np.ndarray, target: int, *, n_per_query: int | None = None, **knn_kw
) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to ``target`` pool rows nearest the seeds: (rows, best cosine per row, N used per query).

    ``n_per_query`` defaults to ceil(target / seeds), doubled until the union reaches ``target``.
    """
    n = len(pool)
    k = n_per_query or first_n_per_query(target, len(seeds), n)
    while True:
        k = min(k, n)
        res = knn_search(pool, seeds, k, **knn_kw)
        rows, best, enough = select_topn(res.ids, res.sims, target)
        if enough or k >= n or n_per_query is not None:
            return rows, best, k
        k *= 2


def first_n_per_query(target: int, seeds: int, n: int) -> int:
    """The neighbours per seed a retrieval starts from: ceil(target / seeds), at most the pool."""
    return min(n, max(1, math.ceil(min(target, n) / max(1, seeds))))


def select_topn(ids: np.ndarray, sims: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The union of the seeds' neighbours (``ids``/``sims`` [seeds, k]), each row ranked by its best
    cosine, cut to ``target``: (rows, best cosines, whether the union reached ``target``)."""
    ids, sims = ids.ravel(), sims.ravel()
    ok = ids >= 0
    ids, sims = ids[ok], sims[ok]
    order = np.argsort(-sims, kind="stable")
    ids, sims = ids[order], sims[order]
    rows, first = np.unique(ids, return_index=True)
    best = sims[first]
    keep = np.argsort(-best, kind="stable")[:target]
    return rows[keep], best[keep], len(rows) >= target


def cluster_sample(
    pool: np.ndarray,
    seeds: np.ndarray,
    target: int,
    *,
    n_clusters: int | None = None,
    seed: int = 0,
    niter: int = 20,
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows sampled uniformly from the k-means clusters that hold seed images, nearest clusters first.

    When the seed-holding clusters have fewer than ``target`` images, all of them are returned.
    """
    n = len(pool)
    k = n_clusters or max(2, min(n // 50, int(4 * math.sqrt(n))))
    k = min(k, n)
    cent, assign = spherical_kmeans(pool, k, niter=niter, seed=seed)
    seed_sims = np.ascontiguousarray(seeds, np.float32) @ cent.T
    seed_cl = seed_sims.argmax(1)
    hits = np.bincount(seed_cl, minlength=k)
    chosen = np.flatnonzero(hits)
    # clusters with more seeds first: they are the densest in seed-like content
    chosen = chosen[np.argsort(-hits[chosen], kind="stable")]
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(assign == c) for c in chosen]
    cap = np.array([len(m) for m in members])
    take = balanced_counts(cap, min(target, int(cap.sum())))
    rows = (
        np.concatenate([rng.choice(m, t, replace=False) for m, t in zip(members, take, strict=True)])
        if len(members)
        else np.zeros(0, np.int64)
    )
    info = {"clusters": int(k), "seed_clusters": int(len(chosen)), "seed_cluster_images": int(cap.sum())}
    return np.sort(rows.astype(np.int64)), info


def balanced_counts(capacity: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` as evenly as possible over bins of the given capacities (water-filling)."""
    capacity = np.asarray(capacity, np.int64)
    if total > capacity.sum():
        raise ValueError(f"cannot take {total} from bins holding {int(capacity.sum())}")
    take = np.zeros(len(capacity), np.int64)
    left = total
    open_ = capacity > 0
    while left > 0 and open_.any():
        idx = np.flatnonzero(open_)
        share = left // len(idx)
        if share == 0:  # fewer items left than open bins: one each to the first bins
            take[idx[:left]] += 1
            break
        add = np.minimum(share, capacity[idx] - take[idx])
        take[idx] += add
        left -= int(add.sum())
        open_ = take < capacity
    return take
