"""Hierarchical k-means with resampling and balanced top-down sampling.

The clustering-based curation of Vo et al. 2024 (ssl-data-curation, used for DINOv3's data): a
pool sampled at random mirrors its long-tailed concept distribution; sampling evenly over a
hierarchy of clusters flattens it. Our reading of the method:

1. Level 1 clusters the embeddings; level l+1 clusters level l's centroids (e.g. 4 levels).
2. Resampled k-means: after each k-means, ``resample_steps`` times, keep the
   ``resample_points`` members nearest each centroid, re-run k-means on that union (warm-started),
   and re-assign everything; dense regions then stop pulling many centroids toward them.
3. Balanced sampling, top-down: the requested count is split evenly over the top clusters (a
   cluster that holds fewer images gives its surplus to the others), each share evenly over its
   children, down to level-1 clusters, where images are drawn at random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dinoflow.curation.retrieval import balanced_counts, spherical_kmeans

log = logging.getLogger(__name__)


@dataclass
class Hierarchy:
    # assign[0]: image -> level-1 cluster; assign[l]: level-l cluster -> level-(l+1) cluster
    assign: list[np.ndarray]
    centroids: list[np.ndarray]

    @property
    def levels(self) -> int:
        return len(self.assign)


def resampled_kmeans(
    x: np.ndarray,
    k: int,
    *,
    resample_steps: int = 2,
    resample_points: int = 10,
    niter: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    cent, assign = spherical_kmeans(x, k, niter=niter, seed=seed)
    for step in range(resample_steps):
        sims = np.einsum("nd,nd->n", x, cent[assign])
        order = np.lexsort((-sims, assign))  # per cluster, nearest first
        lab = assign[order]
        start = np.searchsorted(lab, np.arange(k))
        rank = np.arange(len(order)) - start[lab]
        sub = order[rank < resample_points]
        if len(sub) < k:
            break
        cent, _ = spherical_kmeans(x[sub], k, niter=niter, seed=seed + step + 1, init=cent)
        _, assign = _nearest(x, cent)
    return cent, assign


def _nearest(x: np.ndarray, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(cent.shape[1])
    index.add(np.ascontiguousarray(cent, np.float32))
    s, a = index.search(np.ascontiguousarray(x, np.float32), 1)
    return s[:, 0], a[:, 0].astype(np.int64)


def hierarchical_kmeans(
    x: np.ndarray,
    clusters_per_level: list[int],
    *,
    resample_steps: int = 2,
    resample_points: int = 10,
    niter: int = 20,
    seed: int = 0,
) -> Hierarchy:
    if not clusters_per_level:
        raise ValueError("hierarchical k-means needs at least one level")
    if any(b >= a for a, b in zip(clusters_per_level, clusters_per_level[1:], strict=False)):
        raise ValueError(f"clusters per level must decrease, got {clusters_per_level}")
    if clusters_per_level[0] > len(x):
        raise ValueError(f"level 1 asks for {clusters_per_level[0]} clusters of {len(x)} images")
    assign, cents = [], []
    items = np.ascontiguousarray(x, np.float32)
    for lvl, k in enumerate(clusters_per_level):
        c, a = resampled_kmeans(
            items,
            k,
            resample_steps=resample_steps,
            resample_points=resample_points,
            niter=niter,
            seed=seed + 100 * lvl,
        )
        log.info("hierarchical k-means level %d: %d items -> %d clusters", lvl + 1, len(items), k)
        assign.append(a)
        cents.append(c)
        items = c
    return Hierarchy(assign, cents)


def balanced_sample(h: Hierarchy, target: int, *, seed: int = 0) -> np.ndarray:
    """``target`` image rows chosen evenly top-down through the hierarchy."""
    rng = np.random.default_rng(seed)
    n = len(h.assign[0])
    target = min(target, n)
    # members of each node at every level, as image rows
    leaf_members = _group(h.assign[0])  # level-1 cluster -> image rows
    children = [_group(a) for a in h.assign[1:]]  # level-(l+1) cluster -> level-l clusters
    size = [np.array([len(m) for m in leaf_members])]
    for ch in children:
        size.append(np.array([size[-1][c].sum() for c in ch]))
    top = np.arange(len(size[-1]))
    quota = {int(c): int(t) for c, t in zip(top, balanced_counts(size[-1][top], target), strict=True)}
    for lvl in range(len(children) - 1, -1, -1):
        nxt: dict[int, int] = {}
        for c, q in quota.items():
            kids = children[lvl][c]
            for kid, t in zip(kids, balanced_counts(size[lvl][kids], q), strict=True):
                if t:
                    nxt[int(kid)] = int(t)
        quota = nxt
    rows = [rng.choice(leaf_members[c], q, replace=False) for c, q in quota.items() if q]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def _group(assign: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(assign, kind="stable")
    k = int(assign.max()) + 1 if len(assign) else 0
    cuts = np.searchsorted(assign[order], np.arange(k + 1))
    return [order[cuts[i] : cuts[i + 1]] for i in range(k)]
