"""dinoflow bench dedup-scale: self-dedup of synthetic 256-d embeddings with planted near-duplicates
at growing pool sizes on this machine's cores: wall time, peak memory, recall of the approximate
(IVF) graph against exact search on a query sample, recall of planted duplicates.

Two kinds of data: ``clustered`` (unit vectors around n/100 centres: the IVF lists follow the
clusters, so most exact neighbours share the query's list and recall is easy) and ``uniform``
(isotropic: neighbours spread over many lists, the hard case). For each, the recall is also given
over the exact neighbours that lie outside the query's own IVF list, with the share that lie in it,
and over the exact edges above the threshold (the edges dedup acts on)."""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def synthetic(
    n: int, d: int, dup_fraction: float, seed: int, kind: str = "clustered"
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors, ``clustered`` around n/100 centres or ``uniform`` on the sphere;
    ``dup_fraction`` of rows are noisy copies of others."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_fraction)
    n_base = n - n_dup
    centres = rng.standard_normal((max(1, n // 100), d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n_base, step):
        e = min(n_base, s + step)
        noise = rng.standard_normal((e - s, d), dtype=np.float32)
        if kind == "uniform":
            x[s:e] = noise
        else:  # member-member cosine ~0.4 (< 0.6)
            x[s:e] = centres[rng.integers(0, len(centres), e - s)] + 1.2 * noise
    x[:n_base] /= np.linalg.norm(x[:n_base], axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_dup)
    x[n_base:] = x[src] + 0.02 * rng.standard_normal(
        (n_dup, d), dtype=np.float32
    )  # cosine ~0.95 to its source
    x[n_base:] /= np.linalg.norm(x[n_base:], axis=1, keepdims=True)
    copy_of = np.full(n, -1, np.int64)
    copy_of[n_base:] = src
    return x, copy_of


def run_one(
    n: int, d: int, k: int, threshold: float, exact_max_pool: int, sample: int, seed: int, kind: str
) -> dict:
    import faiss

    from dinoflow.curation.dedup import dedup
    from dinoflow.curation.knn import edges_above, knn_graph, knn_search, recall_at_k

    x, copy_of = synthetic(n, d, 0.05, seed, kind)
    t0 = time.perf_counter()
    g = knn_graph(x, k, exact_max_pool=exact_max_pool, keep_index=True)
    t_graph = time.perf_counter() - t0
    q, nb, _ = edges_above(g, threshold)
    out = dedup(n, {"embedding": (q, nb)})
    secs = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(n, min(sample, n), replace=False)
    exact = knn_search(x, x[rows], k + 1, force="flat")
    # compare neighbour sets without the self match on both sides
    ex = np.where(exact.ids == rows[:, None], -1, exact.ids)
    ann_recall = recall_at_k(g.ids[rows], ex)
    extra = {}
    if g.choice.kind == "ivf":  # neighbours in the query's own list are found whatever nprobe is
        quant = faiss.extract_index_ivf(g.index).quantizer
        own = quant.search(x[rows], 1)[1][:, 0]
        lists = quant.search(x[np.maximum(ex, 0).ravel()], 1)[1][:, 0].reshape(ex.shape)
        same = (lists == own[:, None]) & (ex >= 0)
        cross = np.where(same, -1, ex)
        extra = {
            "same_list_share": round(float(same.sum() / max(1, (ex >= 0).sum())), 4),
            "ann_recall_cross_list": round(recall_at_k(g.ids[rows], cross), 4),
        }
    above = np.where(exact.sims > threshold, ex, -1)
    edge_recall = recall_at_k(g.ids[rows], above) if (above >= 0).any() else None
    g.index = None
    dup = copy_of >= 0
    dup_recall = float((out.labels[dup] == out.labels[copy_of[dup]]).mean())
    return {
        "data": kind,
        "n": n,
        "seconds": round(secs, 2),
        "graph_seconds": round(t_graph, 2),
        "index": g.choice.kind,
        "index_reason": g.choice.reason,
        "kept": int(out.keep.sum()),
        "ann_recall": round(ann_recall, 4),
        **extra,
        "edge_recall_above_threshold": None if edge_recall is None else round(edge_recall, 4),
        "dup_recall": round(dup_recall, 4),
        "threads": faiss.omp_get_max_threads(),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dinoflow bench dedup-scale", description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated pool sizes")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=64, help="neighbours per image (DINOv2: 64)")
    ap.add_argument("--threshold-cos", type=float, default=0.6, help="edge threshold (DINOv2: 0.6)")
    ap.add_argument("--exact-max-pool", type=int, default=50_000)
    ap.add_argument("--sample", type=int, default=1000, help="queries for the ANN-vs-exact recall")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="clustered,uniform", help="comma-separated: clustered, uniform")
    a = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rows = []
    print(
        f"{'data':>9} {'n':>9} {'index':>5} {'seconds':>8} {'ann_rec':>8} {'x-list':>8} {'same':>6} "
        f"{'edge_rec':>8} {'dup_rec':>8} {'peak_GiB':>8}"
    )
    for kind in a.data.split(","):
        for n in [int(s) for s in a.sizes.split(",")]:
            r = run_one(n, a.dim, a.k, a.threshold_cos, a.exact_max_pool, a.sample, a.seed, kind)
            rows.append(r)
            print(
                f"{kind:>9} {r['n']:>9} {r['index']:>5} {r['seconds']:>8} {r['ann_recall']:>8} "
                f"{r.get('ann_recall_cross_list', '-'):>8} {r.get('same_list_share', '-'):>6} "
                f"{r['edge_recall_above_threshold']!s:>8} {r['dup_recall']:>8} {r['peak_rss_gib']:>8}",
                flush=True,
            )

    def pick(kind: str, n: int | None = None) -> dict | None:
        c = [r for r in rows if r["data"] == kind and (n is None or r["n"] == n)]
        return c[-1] if c else None

    first_kind = a.data.split(",")[0]
    last, first = pick(first_kind), [r for r in rows if r["data"] == first_kind][0]
    uni = pick("uniform", last["n"])
    print(
        json.dumps(
            {
                "dedup_1m_seconds": last["seconds"] if last["n"] >= 1_000_000 else None,
                "largest_n": last["n"],
                "largest_seconds": last["seconds"],
                "ann_recall": last["ann_recall"],
                "ann_recall_cross_list": last.get("ann_recall_cross_list"),
                "same_list_share": last.get("same_list_share"),
                "ann_recall_uniform": uni["ann_recall"] if uni else None,
                "edge_recall_uniform": uni["edge_recall_above_threshold"] if uni else None,
                "dup_recall_planted": last["dup_recall"],
                "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
                "threads": a.threads,
                "dim": a.dim,
                "k": a.k,
                "time_growth_ratio": round(last["seconds"] / max(first["seconds"], 1e-9), 2),
                "size_growth_ratio": round(last["n"] / first["n"], 2),
                "runs": rows,
            }
        )
    )
