"""k-NN search over a pool split into partitions, each searched on its own, results merged.

This is how dedup and retrieval fan out: no task holds the whole pool's index.

* **One coarse quantizer.** For an IVF index the coarse quantizer (the list centroids) is trained
  once, on a sample of the pool (:func:`train_coarse`), and every partition's index is built on it.
  A query then probes the same lists in every partition, so the union of what the partitions scan
  is exactly what one index over the whole pool would scan, and the merged top-k is that index's
  top-k: the number of partitions changes where the work runs, never the result.
* **Assigned once.** The lists each row belongs to and probes (:func:`assign`) are computed once and
  handed to every partition (faiss ``add_preassigned`` / ``search_preassigned``), instead of every
  partition running the quantizer over all queries again.
* **Ties.** Merged neighbours are ordered by cosine, then row id (:func:`merge_topk`); each
  partition returns ``TIE_MARGIN`` neighbours more than asked, so equal cosines at the k-th place
  (exact duplicates) resolve the same way whatever the partitioning.
* **Settings for a recall target.** For IVF, ``nprobe`` is chosen on held-out queries: their exact
  neighbours are computed by streaming the pool, and the recall of ``nprobe`` lists is the share of
  those neighbours whose own list is among the query's ``nprobe`` nearest (:func:`recall_by_nprobe`,
  exact for an IVF-Flat index); the smallest ``nprobe`` of a ladder that reaches the target wins.
* **Partitions own rows or lists.** Retrieval's partitions are row ranges; dedup's own whole IVF
  lists (:func:`list_parts`: contiguous list ids balanced by rows), and a query's probes into other
  partitions' lists are skipped. Row ranges split every list over every partition, so each query
  visits its ``nprobe`` lists once per partition, each a fraction as long (at 1M rows and 4
  partitions: 9.04 s for 16,384 queries against 7.76 s for one index; whole lists 7.74 s).
* **Edges above a threshold** (dedup): a range search per partition (:meth:`PartitionIndex.edges_above`),
  each query's ``k`` best kept; merged, they are the edges above the threshold of the merged top-k.
* **Threads.** The CPU top-k search runs in faiss's ``parallel_mode`` 3 (queries split over threads
  inside ``search_preassigned``; the default mode splits them only in ``search``, so the preassigned
  search would run on one thread).
* **GPU.** When faiss sees a GPU (``faiss.get_num_gpus() > 0``) a partition's index is moved to the
  GPUs and searched there (the coarse search on the GPU is cheap; the precomputed lists are unused).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

TIE_MARGIN = 8
TIE_EPS = 1e-6  # cosines this close count as tied (BLAS may round one pair differently by position)
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# a range search call's queries: at most RANGE_BLOCK, and together they probe at most RANGE_PAIRS
# rows of the partition, so even if every probed row matched, the call's result would stay within
# 2^24 pairs (192 MiB of float32 cosines and int64 ids)
RANGE_PAIRS = 1 << 24
RANGE_BLOCK = 16_384
POINTS_PER_LIST = 64  # coarse quantizer sample: 64 points per list (faiss warns below 39)
NLIST_FACTORS = (4, 8, 16)  # IVF lists tried: 4*sqrt(n) .. 16*sqrt(n) (faiss's guideline range)
KMEANS_ITERS = 10  # faiss's k-means iterations for an IVF quantizer (IndexIVF.cp.niter)
REFINE_ITERS = 5  # k-means iterations of a quantizer started from a smaller one's centroids


def part_range(n: int, parts: int, part: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``part`` of ``parts``: contiguous, in whole units of ``align`` rows
    (so a batch never straddles two parts), as even as the units allow."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part {part} is not one of {parts} parts")
    units = math.ceil(n / max(1, align))
    lo = part * units // parts * align
    hi = (part + 1) * units // parts * align
    return min(lo, n), min(hi, n)


def gpu_wanted(use_gpu: bool | None = None) -> bool:
    """Whether to search on GPUs: faiss sees one (``get_num_gpus() > 0``) and the caller allows it."""
    import faiss

    seen = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    return seen if use_gpu is None else bool(use_gpu) and seen


@dataclass
class CoarsePlan:
    """How every partition indexes: ``flat`` (exact) or ``ivf`` on shared ``centroids``."""

    kind: str
    dim: int
    reason: str
    nlist: int = 0
    nprobe: int = 0
    centroids: np.ndarray | None = None  # float32 [nlist, dim]
    tuning: list[dict] = field(default_factory=list)  # the nprobe sweep: [{nprobe, recall}]


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def train_coarse(sample: np.ndarray, nlist: int, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """Centroids of an inner-product IVF coarse quantizer trained on ``sample``: faiss's k-means as
    ``IndexIVFFlat.train`` runs it (spherical, ``KMEANS_ITERS`` iterations from a random start), or,
    with ``init`` (a smaller quantizer's centroids), refined from those split in two: each centroid
    and a slightly perturbed copy, ``REFINE_ITERS`` iterations. On 1M clustered rows, 8,000 lists
    refined from 4,000 in 5 iterations (84 s) found 0.958 of the 64 nearest at nprobe 12; a random
    start needed 10 iterations (168 s) for 0.960, and reached 0.926 in 5."""
    import faiss

    sample = _f32(sample)
    if len(sample) < nlist:
        raise ValueError(f"a {nlist}-list quantizer needs at least {nlist} sample rows, got {len(sample)}")
    d = sample.shape[1]
    if init is None:
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.train(sample)
        return ivf.quantizer.reconstruct_n(0, nlist)
    rng = np.random.default_rng(seed)
    start = np.tile(_f32(init), (-(-nlist // len(init)), 1))[:nlist]
    start[len(init) :] += 0.01 * rng.standard_normal((nlist - len(init), d), dtype=np.float32)
    start /= np.maximum(np.linalg.norm(start, axis=1, keepdims=True), 1e-12)
    cp = faiss.ClusteringParameters()
    cp.niter, cp.spherical, cp.seed = REFINE_ITERS, True, seed
    clus = faiss.Clustering(d, nlist, cp)
    faiss.copy_array_to_vector(np.ascontiguousarray(start).ravel(), clus.centroids)
    clus.train(sample, faiss.IndexFlatIP(d))
    return faiss.vector_to_array(clus.centroids).reshape(nlist, d)


def held_out_rows(n: int, count: int, seed: int = 1) -> np.ndarray:
    """``count`` pool rows (at most a quarter of the pool), sorted, that tune the index: no quantizer
    is trained on them (:func:`coarse_sample`)."""
    count = max(1, min(count, n // 4))
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def coarse_sample(n: int, nlist: int, held: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The sorted pool rows a ``nlist``-list quantizer is trained on: ``POINTS_PER_LIST`` per list (at
    least 10,000), none of the ``held`` rows."""
    rest = np.arange(n) if held is None or not len(held) else np.setdiff1d(np.arange(n), held)
    m = min(len(rest), max(POINTS_PER_LIST * nlist, 10_000))
    return np.sort(np.random.default_rng(seed).choice(rest, m, replace=False))


def assign(centroids: np.ndarray, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, list id) of each row's ``nprobe`` nearest lists, nearest first."""
    import faiss

    q = faiss.IndexFlatIP(centroids.shape[1])
    q.add(_f32(centroids))
    return q.search(_f32(x), min(nprobe, len(centroids)))


def exact_topk(queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int):
    """Exact top-``k`` (cosine, row) of ``queries`` over a pool given as ``(first row, rows)`` blocks."""
    import faiss

    queries = _f32(queries)
    best = (np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64))
    for lo, block in blocks:
        s, i = faiss.knn(queries, _f32(block), min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best = merge_topk([best, (s, np.where(i >= 0, i + lo, -1))], k)
    return best


def recall_by_nprobe(probes: np.ndarray, neighbour_lists: np.ndarray) -> dict[int, float]:
    """Recall of an IVF-Flat search at each ``nprobe`` up to ``probes.shape[1]``.

    ``probes``: [q, P] each query's lists, nearest first; ``neighbour_lists``: [q, k] the list of
    each of its exact neighbours (-1: none). A neighbour is found iff its list is probed."""
    q, p = probes.shape
    pos = np.full(neighbour_lists.shape, p, np.int64)
    for c in range(p - 1, -1, -1):  # first position wins
        pos[neighbour_lists == probes[:, c : c + 1]] = c
    valid = neighbour_lists >= 0
    total = max(1, int(valid.sum()))
    return {n: float(((pos < n) & valid).sum() / total) for n in range(1, p + 1)}


def choose_nprobe(
    recall: dict[int, float], target: float, nlist: int, edge_recall: dict[int, float] | None = None
) -> tuple[int, list[dict]]:
    """The smallest ``nprobe`` of the ladder whose recall reaches ``target`` (else the largest tried)
    and, with ``edge_recall`` (recall of the neighbours above a cosine threshold: the edges dedup acts
    on), one ladder step above the first that finds all of those: a held-out sample holds few such
    edges, so the step is the margin that keeps their recall at 1 on the whole pool."""
    ladder = [n for n in NPROBE_LADDER if n <= min(nlist, max(recall))] or [max(recall)]
    table = [{"nprobe": n, "recall": round(recall[n], 4)} for n in ladder]
    if edge_recall is not None:
        for row in table:
            row["edge_recall"] = round(edge_recall[row["nprobe"]], 4)
    pick = next((i for i, row in enumerate(table) if row["recall"] >= target), len(table) - 1)
    if edge_recall is not None:
        full = next((i for i, row in enumerate(table) if row["edge_recall"] >= 1.0), len(table) - 1)
        pick = max(pick, min(full + 1, len(table) - 1))
    return table[pick]["nprobe"], table


def _sweep(
    centroids: np.ndarray,
    queries: np.ndarray,
    sims: np.ndarray,
    neighbours: np.ndarray,
    target: float,
    threshold: float | None,
) -> tuple[int, list[dict]]:
    """:func:`choose_nprobe` for ``centroids``, given the queries' exact neighbours (``sims``, and
    ``neighbours``: their vectors, one row per valid neighbour id, in ``sims``' row-major order)."""
    valid = np.isfinite(sims)
    lists = np.full(sims.shape, -1, np.int64)
    if valid.any():
        lists[valid] = assign(centroids, neighbours, 1)[1][:, 0]
    _, probes = assign(centroids, queries, min(len(centroids), NPROBE_LADDER[-1]))
    edge = None
    if threshold is not None and ((sims > threshold) & (lists >= 0)).any():
        edge = recall_by_nprobe(probes, np.where(sims > threshold, lists, -1))
    return choose_nprobe(recall_by_nprobe(probes, lists), target, len(centroids), edge)


def _exact(queries, blocks, rows_of, k, query_rows):
    """The queries' exact ``k`` nearest pool rows (their own row left out) and those rows' vectors."""
    sims, ids = exact_topk(queries, blocks(), k + (query_rows is not None))
    if query_rows is not None:
        own = ids == np.asarray(query_rows)[:, None]
        ids, sims = np.where(own, -1, ids), np.where(own, -np.inf, sims)
    sims = np.where(ids >= 0, sims, -np.inf)
    vecs = rows_of(ids[ids >= 0]) if (ids >= 0).any() else np.zeros((0, queries.shape[1]), np.float32)
    return sims, vecs


def tune_nprobe(
    queries: np.ndarray,
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    rows_of: Callable[[np.ndarray], np.ndarray],
    centroids: np.ndarray,
    k: int,
    target: float,
    query_rows: np.ndarray | None = None,
    threshold: float | None = None,
) -> tuple[int, list[dict]]:
    """The fewest IVF lists (``nprobe``) whose recall of the ``queries``' exact ``k`` nearest pool rows
    reaches ``target`` (and, with ``threshold``, that keep every neighbour above that cosine: see
    :func:`choose_nprobe`), and the sweep. ``blocks()`` streams the pool as ``(first row, rows)``;
    ``rows_of(ids)`` gives pool rows by id; ``query_rows``: the queries' own pool rows (excluded from
    their neighbours), when they come from the pool."""
    sims, vecs = _exact(queries, blocks, rows_of, k, query_rows)
    return _sweep(centroids, queries, sims, vecs, target, threshold)


def nlist_ladder(n: int) -> list[int]:
    """IVF list counts to try for a pool of ``n``: faiss's guideline range, 4*sqrt(n) to 16*sqrt(n)
    lists (faiss wiki, "Guidelines to choose an index"), doubling, capped at 65,536 lists and at 39
    pool rows per list (faiss's minimum training points per centroid)."""
    out: list[int] = []
    cap = min(65536, max(1, n // 39))
    for f in NLIST_FACTORS:
        nl = int(max(f * math.sqrt(n), 1))
        if nl >= cap:  # the cap itself, unless it is barely above the last count
            if not out or cap >= 1.5 * out[-1]:
                out.append(cap)
            break
        out.append(nl)
    return out


def kmeans_cost(nlist: int, iters: int = KMEANS_ITERS) -> float:
    """Dot products to train a ``nlist``-list quantizer: ``iters`` k-means iterations over
    ``POINTS_PER_LIST`` sample rows per list."""
    return float(iters) * POINTS_PER_LIST * nlist * nlist


def search_cost(queries: int, n: int, nlist: int, nprobe: int) -> float:
    """Dot products of an IVF-Flat search: each query against every centroid and the rows of its
    ``nprobe`` lists (lists taken as even: ``n / nlist`` rows each)."""
    return float(queries) * (nlist + nprobe * n / nlist)


@dataclass
class IvfTuning:
    nlist: int
    nprobe: int
    centroids: np.ndarray
    tuning: list[dict]  # the chosen nlist's nprobe sweep: [{nprobe, recall[, edge_recall]}]
    nlist_sweep: list[dict]  # each nlist tried: {nlist, nprobe, recall, reached, search_gdots, ...}


def tune_ivf(
    n: int,
    queries: np.ndarray,
    blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    rows_of: Callable[[np.ndarray], np.ndarray],
    train: Callable[[int, np.ndarray | None], np.ndarray],
    k: int,
    target: float,
    *,
    search_queries: int,
    query_rows: np.ndarray | None = None,
    threshold: float | None = None,
    nlist: int | None = None,
    ladder: list[int] | None = None,
) -> IvfTuning:
    """Choose the IVF list count and ``nprobe`` for a recall ``target`` on held-out ``queries``.

    The queries' exact neighbours are computed once (one stream of the pool). Then, from the smallest
    list count of :func:`nlist_ladder` up, a quantizer is trained (``train(nlist, init)`` gives
    centroids; ``init``: the previous count's, to refine from, see :func:`train_coarse`) and its
    nprobe sweep measured (:func:`choose_nprobe`). The next, larger count is tried when this one
    misses the target at every nprobe of the ladder, or when the search it needs (``search_queries``
    queries, :func:`search_cost`) would cost more than refining the next quantizer
    (:func:`kmeans_cost`) and searching it with one list: more lists make lists shorter, so the same
    recall needs fewer rows scanned; they pay when the scan dominates. Of the counts
    tried, the cheapest search that reaches the target wins (else the best recall). ``nlist`` fixes
    the count (its nprobe is still tuned); ``ladder`` replaces :func:`nlist_ladder`."""
    import time

    sims, vecs = _exact(queries, blocks, rows_of, k, query_rows)
    ladder = [nlist] if nlist else list(ladder or nlist_ladder(n))
    tried: list[tuple[IvfTuning, dict]] = []
    for step, nl in enumerate(ladder):
        t0 = time.perf_counter()
        cents = train(nl, tried[-1][0].centroids if tried else None)
        train_s = time.perf_counter() - t0
        nprobe, table = _sweep(cents, queries, sims, vecs, target, threshold)
        row = next(r for r in table if r["nprobe"] == nprobe)
        cost = search_cost(search_queries, n, nl, nprobe)
        info = {
            "nlist": nl,
            "nprobe": nprobe,
            "recall": row["recall"],
            "reached": row["recall"] >= target,
            "search_gdots": round(cost / 1e9, 2),
            "train_seconds": round(train_s, 1),
        }
        tried.append((IvfTuning(nl, nprobe, cents, table, []), info))
        log.info("ivf tuning: %s", info)
        if step + 1 < len(ladder):
            nxt = ladder[step + 1]
            pays = cost > kmeans_cost(nxt, REFINE_ITERS) + search_cost(search_queries, n, nxt, 1)
            info["next_pays"] = bool(pays)
            if info["reached"] and not pays:
                break
    reached = [t for t in tried if t[1]["reached"]]
    best = (
        min(reached, key=lambda t: t[1]["search_gdots"])
        if reached
        else max(tried, key=lambda t: t[1]["recall"])
    )[0]
    best.nlist_sweep = [info for _, info in tried]
    return best


class PartitionIndex:
    """One partition's index: rows ``first_row .. first_row + len(x)`` of the pool (or, for IVF, the
    pool rows ``ids``), searched for neighbours reported by their pool row."""

    def __init__(
        self,
        x: np.ndarray,
        first_row: int,
        plan: CoarsePlan,
        *,
        own_lists: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        use_gpu: bool | None = None,
    ):
        import faiss

        x = _f32(x)
        self.first_row, self.plan, self.n = int(first_row), plan, len(x)
        self.on_gpu = gpu_wanted(use_gpu)
        self._x = x if plan.kind == "flat" else None
        if plan.kind == "flat":
            index = faiss.IndexFlatIP(plan.dim)
            index.add(x)
        else:
            self._quantizer = faiss.IndexFlatIP(plan.dim)  # kept alive with the index
            self._quantizer.add(_f32(plan.centroids))
            index = faiss.IndexIVFFlat(self._quantizer, plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = plan.nprobe
            # the rows' pool rows: a row range from first_row, or any rows (partitions owning lists)
            if ids is None:
                ids = np.arange(self.first_row, self.first_row + len(x), dtype=np.int64)
            ids = np.ascontiguousarray(ids, np.int64)
            if own_lists is not None and not self.on_gpu:
                from faiss.contrib.ivf_tools import add_preassigned

                add_preassigned(index, x, np.ascontiguousarray(own_lists, np.int64), ids)
            else:
                index.add_with_ids(x, ids)
            self._list_sizes = np.array([index.invlists.list_size(j) for j in range(plan.nlist)], np.int64)
        if self.on_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
            if plan.kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", plan.nprobe)
        self.index = index

    def search(self, queries: np.ndarray, k: int, probes: np.ndarray | None = None, min_sim: float = -np.inf):
        """Top-``k`` (cosine, pool row) of each query within this partition, plus ``TIE_MARGIN`` more,
        plus every row tied with the ``k``-th (searched again with more neighbours while the tie
        reaches the end of the list); ``probes``: the queries' precomputed lists ([q, nprobe], from
        :func:`assign`), used on the CPU. ``min_sim``: ties at or below it are not followed (a
        caller that keeps only edges above a threshold needs none of them; a query whose vector is
        zero, e.g. a blank image's pixel descriptor, ties with every row at 0)."""
        q = _f32(queries)
        kk = min(k + TIE_MARGIN, self.n)
        s, i = self._search(q, kk, probes)
        if kk == 0 or kk >= self.n or k < 1:
            return s, i
        redo = np.flatnonzero(
            (i[:, -1] >= 0) & (s[:, min(k, kk) - 1] - s[:, -1] <= TIE_EPS) & (s[:, -1] > min_sim)
        )
        while len(redo) and kk < self.n:
            kk = min(2 * kk, self.n)
            rs, ri = self._search(q[redo], kk, None if probes is None else probes[redo])
            pad = kk - s.shape[1]
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
            s[redo], i[redo] = rs, ri
            redo = redo[
                (ri[:, -1] >= 0) & (rs[:, min(k, kk) - 1] - rs[:, -1] <= TIE_EPS) & (rs[:, -1] > min_sim)
            ]
        return s, i

    def edges_above(
        self,
        queries: np.ndarray,
        first_query: int,
        threshold: float,
        k: int,
        probes: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each query's ``k`` best neighbours in this partition with cosine above ``threshold``, itself
        left out, as edges (query row, pool row, cosine) in :func:`merge_edges`' order; queries are
        rows ``first_query ..`` of the pool. The union of every partition's edges, merged by
        :func:`merge_edges`, is the edges above ``threshold`` of the merged top-``k``.

        An IVF index on the CPU with the queries' lists (``probes``) runs a range search: no top-k
        heap per query and partition (on 4 partitions of 500k rows, top-73 heaps made the search 24 %
        slower than one index over the whole pool; the range search is as fast as that index), in
        query blocks whose probed lists hold at most ``RANGE_PAIRS`` rows of this partition (what the
        block's result could hold at most: a bound that does not depend on the data, unlike the
        count of matches; see :func:`range_blocks`). Otherwise the top-``k`` search
        (:meth:`search`), cut at ``threshold``."""
        q = _f32(queries)
        if self.plan.kind != "ivf" or probes is None or self.on_gpu:
            s, i = self.search(q, k + 1, probes, min_sim=threshold)
            r, c = np.nonzero((s > threshold) & (i >= 0))
            return merge_edges(r + first_query, i[r, c], s[r, c], k)
        probes = np.ascontiguousarray(probes, np.int64)
        self.index.parallel_mode = 0  # range_search_preassigned splits queries over threads in mode 0
        found = []
        bounds = np.where(probes >= 0, self._list_sizes[np.maximum(probes, 0)], 0).sum(1)
        for lo, hi in range_blocks(bounds, RANGE_PAIRS, RANGE_BLOCK):
            # inner product: faiss returns the rows scoring strictly above the threshold
            lims, s, i = self.index.range_search_preassigned(q[lo:hi], float(threshold), probes[lo:hi], None)
            rows = np.repeat(
                np.arange(first_query + lo, first_query + lo + len(lims) - 1), np.diff(lims.astype(np.int64))
            )
            found.append(merge_edges(rows, i, np.minimum(s, 1.0), k))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return tuple(np.concatenate(a) for a in zip(*found, strict=True))

    def _search(self, q: np.ndarray, kk: int, probes: np.ndarray | None):
        if kk == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.plan.kind == "ivf" and probes is not None and not self.on_gpu:
            from faiss.contrib.ivf_tools import search_preassigned

            # faiss's default mode 0 splits the queries over threads in ``search`` only, and runs
            # ``search_preassigned`` on one thread; mode 3 splits them inside it (a query's result
            # does not depend on the thread that computes it)
            self.index.parallel_mode = 3
            s, i = search_preassigned(self.index, q, kk, np.ascontiguousarray(probes, np.int64))
        else:
            s, i = self.index.search(q, kk)
            if self.plan.kind == "flat":
                # BLAS rounds a pair's cosine by its place in the matrix: score the pairs one by one
                s = np.where(i >= 0, _pair_cosines(q, self._x, i), -np.inf).astype(np.float32)
                i = np.where(i >= 0, i + self.first_row, -1)
        # float16-stored unit vectors can score a hair above 1; a cosine is at most 1
        return np.minimum(s, 1.0), i


def list_parts(first_lists: np.ndarray, nlist: int, parts: int) -> np.ndarray:
    """int64 [nlist]: the partition that owns each IVF list, given every pool row's list: contiguous
    runs of list ids, a list going to the partition its rows' middle falls in, so each partition
    holds about rows / parts rows (whole lists: a list is never split)."""
    sizes = np.bincount(np.asarray(first_lists, np.int64), minlength=nlist)[:nlist]
    ends = np.cumsum(sizes)
    middle = ends - sizes / 2
    return np.minimum((middle * parts // max(int(ends[-1]), 1)).astype(np.int64), parts - 1)


def range_blocks(bounds: np.ndarray, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of queries, each at most ``max_rows`` long and with ``bounds``
    (each query's most possible matches) summing to at most ``budget``; a query whose own bound is
    above the budget is a range alone."""
    ends = np.cumsum(np.asarray(bounds, np.int64))
    out, lo, n = [], 0, len(ends)
    while lo < n:
        before = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, before + budget, side="right"))
        hi = min(max(hi, lo + 1), lo + max_rows, n)
        out.append((lo, hi))
        lo = hi
    return out


def _pair_cosines(q: np.ndarray, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``q[r] . x[ids[r, c]]`` for every entry, summed in float64 (the same value wherever the
    pair sits)."""
    out = np.empty(ids.shape, np.float64)
    for c in range(ids.shape[1]):
        xs = x[np.maximum(ids[:, c], 0)].astype(np.float64)
        out[:, c] = np.einsum("ij,ij->i", q.astype(np.float64), xs)
    return out


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each row over several (cosine, id) candidate lists: cosine descending, then id
    ascending; missing entries (id -1) last, with cosine -inf."""
    sims = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(ids >= 0, ids, big), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def merge_edges(
    q: np.ndarray, j: np.ndarray, s: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best edges of each query (cosine descending, then neighbour row) among candidate
    edges ``(q, j, s)`` gathered from all partitions; self edges dropped."""
    q, j, s = np.asarray(q, np.int64), np.asarray(j, np.int64), np.asarray(s, np.float32)
    ok = (j >= 0) & (j != q)
    q, j, s = q[ok], j[ok], s[ok]
    order = np.lexsort((j, -s, q))
    q, j, s = q[order], j[order], s[order]
    start = np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1]
    rank = np.arange(len(q)) - np.repeat(start, np.diff(np.r_[start, len(q)]))
    keep = rank < k
    return q[keep], j[keep], s[keep]
