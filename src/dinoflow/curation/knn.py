"""k-nearest-neighbour search on L2-normalised embeddings with faiss (inner product = cosine).

The index is chosen from the pool size, and the reason is logged and returned:

* ``flat``: ``IndexFlatIP``, exact; used while the pool has at most ``exact_max_pool`` vectors
  (a brute-force pass costs n_pool * n_query * d multiply-adds, BLAS-fast for ~1e5 vectors).
* ``ivf``: ``IndexIVFFlat`` with ~4*sqrt(n) inverted lists (faiss's guideline for 1e5-1e7 vectors),
  trained on a sample, searched with ``nprobe`` lists; approximate, far cheaper for large pools.
  DINOv2 used IVF-PQ on GPUs for its 1.2B-image pool.

When faiss was built with GPU support and a GPU is visible, the index is moved to all GPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EXACT_MAX_POOL = 100_000


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # "flat" or "ivf"
    reason: str
    nlist: int = 0
    nprobe: int = 0


@dataclass
class KnnResult:
    sims: np.ndarray  # float32 [n_query, k], cosine, descending
    ids: np.ndarray  # int64 [n_query, k], -1 where fewer than k neighbours were found
    choice: IndexChoice
    on_gpu: bool = False
    index: object = None  # the faiss index, only when asked for (keep_index=True)


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_index(
    n_pool: int,
    dim: int,
    *,
    exact_max_pool: int = DEFAULT_EXACT_MAX_POOL,
    nlist: int | None = None,
    nprobe: int | None = None,
    force: str | None = None,
) -> IndexChoice:
    """Exact for small pools, IVF for large ones; ``force`` ('flat'|'ivf') overrides the rule."""
    if force not in (None, "auto", "flat", "ivf"):
        raise ValueError(f"index kind must be auto, flat or ivf, got {force!r}")
    kind = force if force in ("flat", "ivf") else ("flat" if n_pool <= exact_max_pool else "ivf")
    if kind == "flat":
        why = "forced by spec" if force == "flat" else f"pool of {n_pool} <= exact_max_pool={exact_max_pool}"
        gflop = n_pool * n_pool * dim / 1e9
        return IndexChoice("flat", f"exact IndexFlatIP: {why} (~{gflop:.0f} GFLOP for a self-graph)")
    from dinoflow.curation.partition import nlist_ladder

    # 4*sqrt(n) lists, at least 39 training points per list (faiss): the first count plans tune from
    nl = nlist or nlist_ladder(n_pool)[0]
    npb = nprobe or max(1, min(nl, 16))
    why = "forced by spec" if force == "ivf" else f"pool of {n_pool} > exact_max_pool={exact_max_pool}"
    return IndexChoice(
        "ivf", f"approximate IndexIVFFlat: {why}; nlist={nl} (~4*sqrt(n)), nprobe={npb}", nlist=nl, nprobe=npb
    )


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    pool: np.ndarray,
    choice: IndexChoice,
    *,
    seed: int = 0,
    train_size: int | None = None,
    use_gpu: bool | None = None,
):
    """A searchable faiss index over ``pool`` (inner product)."""
    import faiss

    pool = _as_f32(pool)
    n, d = pool.shape
    if choice.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
        # 64 points per list trains the coarse quantizer well (faiss warns below 39)
        m = min(n, train_size or max(64 * choice.nlist, 10_000))
        rng = np.random.default_rng(seed)
        sample = pool if m >= n else pool[np.sort(rng.choice(n, m, replace=False))]
        index.train(sample)
        index.nprobe = choice.nprobe
    gpu = faiss_gpu_available() if use_gpu is None else (use_gpu and faiss_gpu_available())
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
        if choice.kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", choice.nprobe)
    index.add(pool)
    return index, gpu


def knn_search(
    pool: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exact_max_pool: int = DEFAULT_EXACT_MAX_POOL,
    force: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    batch: int = 65536,
    use_gpu: bool | None = None,
    keep_index: bool = False,
) -> KnnResult:
    """Top-``k`` pool neighbours of each query (cosine on L2-normalised rows)."""
    pool, queries = _as_f32(pool), _as_f32(queries)
    if pool.ndim != 2 or queries.ndim != 2 or pool.shape[1] != queries.shape[1]:
        raise ValueError(
            f"knn_search: pool {pool.shape} and queries {queries.shape} must be [n, d] with one d"
        )
    if k < 1:
        raise ValueError(f"knn_search: k must be >= 1, got {k}")
    choice = choose_index(
        len(pool), pool.shape[1], exact_max_pool=exact_max_pool, nlist=nlist, nprobe=nprobe, force=force
    )
    log.info("k-NN index: %s", choice.reason)
    index, gpu = build_index(pool, choice, seed=seed, use_gpu=use_gpu)
    kk = min(k, len(pool))
    sims = np.empty((len(queries), kk), np.float32)
    ids = np.empty((len(queries), kk), np.int64)
    for s in range(0, len(queries), batch):
        sims[s : s + batch], ids[s : s + batch] = index.search(queries[s : s + batch], kk)
    # float16-stored unit vectors can score a hair above 1; a cosine is at most 1, so a threshold of 1
    # (the spec's upper bound) really means "never"
    np.minimum(sims, 1.0, out=sims)
    return KnnResult(sims, ids, choice, gpu, index if keep_index else None)


def knn_graph(x: np.ndarray, k: int, **kw) -> KnnResult:
    """Each row's ``k`` nearest other rows (self excluded): searches k+1 and drops the self match."""
    res = knn_search(x, x, k + 1, **kw)
    n = len(x)
    own = res.ids == np.arange(n)[:, None]
    # rows whose self match was not returned (ties, IVF misses) drop their last column instead
    drop = np.where(own.any(1), own.argmax(1), res.ids.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    kk = res.ids.shape[1] - 1
    return KnnResult(
        res.sims[keep].reshape(n, kk), res.ids[keep].reshape(n, kk), res.choice, res.on_gpu, res.index
    )


def edges_above(
    res: KnnResult, threshold: float, query_offset: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query ids, neighbour ids, cosine) of every graph edge with cosine > ``threshold``."""
    mask = (res.sims > threshold) & (res.ids >= 0)
    q, j = np.nonzero(mask)
    return q.astype(np.int64) + query_offset, res.ids[q, j], res.sims[q, j]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k neighbours that the approximate search also returned."""
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx_ids, exact_ids, strict=True))
    return hits / max(1, int((exact_ids >= 0).sum()))
