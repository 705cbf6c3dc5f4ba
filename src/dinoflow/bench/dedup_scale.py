"""dinoflow bench dedup-scale: self-dedup of synthetic 256-d embeddings (clustered, with planted
near-duplicates) at growing pool sizes on this machine's cores: wall time, peak memory, recall of
the approximate (IVF) graph against exact search on a query sample, recall of planted duplicates."""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def synthetic(n: int, d: int, dup_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n/100 cluster centres; ``dup_fraction`` of rows are noisy copies of others."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_fraction)
    n_base = n - n_dup
    centres = rng.standard_normal((max(1, n // 100), d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n_base, step):
        e = min(n_base, s + step)
        x[s:e] = centres[
            rng.integers(0, len(centres), e - s)
        ] + 1.2 * rng.standard_normal(  # member-member cosine ~0.4 (< 0.6)
            (e - s, d), dtype=np.float32
        )
    x[:n_base] /= np.linalg.norm(x[:n_base], axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_dup)
    x[n_base:] = x[src] + 0.02 * rng.standard_normal(
        (n_dup, d), dtype=np.float32
    )  # cosine ~0.95 to its source
    x[n_base:] /= np.linalg.norm(x[n_base:], axis=1, keepdims=True)
    copy_of = np.full(n, -1, np.int64)
    copy_of[n_base:] = src
    return x, copy_of


def run_one(n: int, d: int, k: int, threshold: float, exact_max_pool: int, sample: int, seed: int) -> dict:
    import faiss

    from dinoflow.curation.dedup import dedup
    from dinoflow.curation.knn import edges_above, knn_graph, knn_search, recall_at_k

    x, copy_of = synthetic(n, d, 0.05, seed)
    t0 = time.perf_counter()
    g = knn_graph(x, k, exact_max_pool=exact_max_pool)
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
    dup = copy_of >= 0
    dup_recall = float((out.labels[dup] == out.labels[copy_of[dup]]).mean())
    return {
        "n": n,
        "seconds": round(secs, 2),
        "graph_seconds": round(t_graph, 2),
        "index": g.choice.kind,
        "index_reason": g.choice.reason,
        "kept": int(out.keep.sum()),
        "ann_recall": round(ann_recall, 4),
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
    a = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rows = []
    print(
        f"{'n':>9} {'index':>5} {'seconds':>8} {'graph_s':>8} {'ann_rec':>8} {'dup_rec':>8} {'peak_GiB':>8}"
    )
    for n in [int(s) for s in a.sizes.split(",")]:
        r = run_one(n, a.dim, a.k, a.threshold_cos, a.exact_max_pool, a.sample, a.seed)
        rows.append(r)
        print(
            f"{r['n']:>9} {r['index']:>5} {r['seconds']:>8} {r['graph_seconds']:>8} {r['ann_recall']:>8} "
            f"{r['dup_recall']:>8} {r['peak_rss_gib']:>8}",
            flush=True,
        )
    last, first = rows[-1], rows[0]
    print(
        json.dumps(
            {
                "dedup_1m_seconds": last["seconds"] if last["n"] >= 1_000_000 else None,
                "largest_n": last["n"],
                "largest_seconds": last["seconds"],
                "ann_recall": last["ann_recall"],
                "dup_recall_planted": last["dup_recall"],
                "peak_rss_gib": last["peak_rss_gib"],
                "threads": a.threads,
                "dim": a.dim,
                "k": a.k,
                "time_growth_ratio": round(last["seconds"] / max(first["seconds"], 1e-9), 2),
                "size_growth_ratio": round(last["n"] / first["n"], 2),
                "runs": rows,
            }
        )
    )
