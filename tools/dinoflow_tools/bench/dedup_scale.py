"""dinoflow bench dedup-scale: the dedup stage on synthetic 256-d embeddings with planted
near-duplicates at growing pool sizes, run as a cluster runs it, against plain faiss on the same data.

The stage runs in ``--partitions`` parts, each phase in its own process reading the embeddings from
the object store (plan: coarse quantizer on a sample, nprobe tuned for ``--recall-target`` on held-out
rows, every row's lists; each part: its partition indexed and every row searched; collect: top-k
merged, hashes, groups, kept manifest and embeddings written). ``dedup_seconds`` is the sum of the
phases (one machine running them one after another; ``critical_path_seconds`` is plan + slowest part
+ collect, what parallel tasks would take); ``peak_rss_part_gib`` the largest part's peak RSS.

Plain faiss (``raw_faiss_*``) builds one ``IndexIVFFlat`` over the whole pool in this process with the
configuration the stage chose (the same nlist, a quantizer trained by faiss's own k-means on the same
sample with the same seed, the same nprobe) and searches every row: what a user who already knew the
configuration would run. The stage also pays for finding it (``nlist_sweep``: each list count it
trained; a larger count's quantizer refined from the smaller one's), and the recalls of both are
reported.
For pools up to ``--exact-max-pool`` both are exact (``IndexFlatIP``).

Recall figures, on ``--sample`` query rows against exact search: ``ann_recall`` (the stage's k-NN
graph; its partitions are rebuilt here from the plan the stage stored), ``edge_recall_above_threshold``
(the stage's stored edges above ``--threshold-cos``), ``dup_recall`` (planted copies grouped with
their source in the stage's output). Data: ``clustered`` (unit vectors around n/100 centres, member
cosine ~0.4) or ``uniform`` (isotropic, the hard case for IVF)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

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


def write_pool(store, root: str, x: np.ndarray) -> tuple[str, str]:
    """The embeddings (float16, as the embed stage stores them) and a manifest of as many rows."""
    import pyarrow as pa

    from dinoflow.data.embeddings import write_embeddings
    from dinoflow.data.manifest import SCHEMA, write_manifest

    n = len(x)
    keys = pa.array([f"r{i:08d}" for i in range(n)])
    cols = {
        "key": keys,
        "shard": pa.array(["s3://none/shard-000000.tar"] * n),
        "member": keys,
        "source": pa.array(["synthetic"] * n),
        "label": pa.array(np.full(n, -1, np.int64)),
        "width": pa.array(np.ones(n, np.int32)),
        "height": pa.array(np.ones(n, np.int32)),
        "sha256": keys,
        "split": pa.array(["pool"] * n),
    }
    manifest = f"{root}/manifest.parquet"
    write_manifest(store, manifest, pa.table(cols, schema=SCHEMA))
    write_embeddings(store, f"{root}/emb", x.astype(np.float16), meta={"manifest_uri": manifest})
    return manifest, f"{root}/emb"


def _child(argv: list[str]) -> None:
    """One phase of the stage in its own process: prints its wall time and peak RSS."""
    phase, part, spec_json, threads = argv[0], int(argv[1]), argv[2], int(argv[3])
    import faiss

    from dinoflow.stages import get_stage
    from dinoflow.storage import open_store

    faiss.omp_set_num_threads(threads)
    stage, store = get_stage("dedup"), open_store()
    spec = stage.parse_spec(spec_json)
    t0 = time.perf_counter()
    if phase == "collect":
        stage.run(spec, store)
    else:
        stage.run_phase(spec, store, phase, part)
    secs = time.perf_counter() - t0
    from ._rss import peak_rss_mib

    print(json.dumps({"seconds": secs, "peak_rss_gib": peak_rss_mib() / 1024}))


def run_phase(store, phase: str, part: int, spec_json: str, threads: int) -> dict:
    s = store.settings
    env = {
        **os.environ,
        "DINOFLOW_S3_ENDPOINT": s.endpoint,
        "DINOFLOW_S3_ACCESS_KEY": s.access_key.get_secret_value(),
        "DINOFLOW_S3_SECRET_KEY": s.secret_key.get_secret_value(),
        "OMP_NUM_THREADS": str(threads),
    }
    cmd = [sys.executable, "-m", __name__, "--child", phase, str(part), spec_json, str(threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"dedup {phase} {part} failed: {out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["wall_seconds"] = time.perf_counter() - t0  # with the process start, as a pod pays it
    return got


def stage_graph_sample(store, spec, planned: dict, x: np.ndarray, rows: np.ndarray, k: int):
    """The stage's top-k of ``rows``: its partitions rebuilt from the stored plan (as its parts built
    them), searched for these rows only, merged."""
    from dinoflow.curation import partition as pt
    from dinoflow.stages import _fanout
    from dinoflow.stages.dedup import _first_lists, _lists

    coarse = _fanout.coarse_plan(spec, store, planned)
    n, found = len(x), []
    if coarse.kind == "ivf":  # each part owns whole lists (dedup.search_part)
        probes = _lists(store, spec, 0, n)[rows]
        first = _first_lists(store, spec, n)
        owner = pt.list_parts(first, coarse.nlist, spec.parts)
    for p in range(spec.parts):
        if coarse.kind == "ivf":
            mine = np.flatnonzero(owner[first] == p)
            index = pt.PartitionIndex(x[mine], 0, coarse, own_lists=first[mine], ids=mine)
            found.append(index.search(x[rows], k + 1, np.where(owner[probes] == p, probes, -1)))
        else:
            lo, hi = pt.part_range(n, spec.parts, p)
            found.append(pt.PartitionIndex(x[lo:hi], lo, coarse).search(x[rows], k + 1))
    _, ids = pt.merge_topk(found, k + 1)
    ids = np.where(ids == rows[:, None], -1, ids)
    return ids


def raw_faiss(
    x: np.ndarray, planned: dict, k: int, rows: np.ndarray, threads: int, tune_queries: int
) -> dict:
    """One faiss index over the whole pool at the stage's configuration; every row searched."""
    import faiss

    from dinoflow.curation.partition import coarse_sample, held_out_rows

    faiss.omp_set_num_threads(threads)
    n, d = x.shape
    t0 = time.perf_counter()
    if planned["kind"] == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = planned["nlist"]
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = coarse_sample(n, nlist, held_out_rows(n, tune_queries))  # the stage's sample
        index.cp.seed = 0
        index.train(x[sample])
        index.nprobe = planned["nprobe"]
    index.add(x)
    ids = np.empty((n, k + 1), np.int64)
    for s in range(0, n, 65_536):
        _, ids[s : s + 65_536] = index.search(x[s : s + 65_536], k + 1)
    secs = time.perf_counter() - t0
    sample_ids = np.where(ids[rows] == rows[:, None], -1, ids[rows])
    return {"seconds": secs, "ids": sample_ids}


def run_one(store, a, n: int, kind: str) -> dict:
    import faiss
    import pyarrow.parquet as pq

    from dinoflow.curation.descriptors import l2_normalize
    from dinoflow.curation.knn import recall_at_k
    from dinoflow.stages import get_stage

    x, copy_of = synthetic(n, a.dim, 0.05, a.seed, kind)
    root = f"s3://bench-dedup-scale/{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    manifest, emb = write_pool(store, root, x)
    # what the stage compares: the stored float16 rows, L2-normalised again (the same bits here)
    x = l2_normalize(x.astype(np.float16).astype(np.float32))
    write_s = time.perf_counter() - t0
    stage = get_stage("dedup")
    spec = stage.parse_spec(
        {
            "output_uri": f"{root}/dedup",
            "manifest_uri": manifest,
            "embeddings_uri": emb,
            "k": a.k,
            "threshold_cos": a.threshold_cos,
            "exact_max_pool": a.exact_max_pool,
            "recall_target": a.recall_target,
            "parts": a.partitions,
            "exact_hash": False,
            "phash_max_bits": -1,
            "copy_detection": {"enabled": False},
            "max_removed_fraction": 1.0,
        }
    )
    spec_json = spec.model_dump_json()
    phases = [("plan", 0)] + [("part", p) for p in range(a.partitions)] + [("collect", 0)]
    runs = {
        f"{ph}{'' if ph != 'part' else p}": run_phase(store, ph, p, spec_json, a.threads) for ph, p in phases
    }
    planned = store.read_success(spec.out("plan"))["result"]
    parts = [runs[f"part{p}"] for p in range(a.partitions)]
    dedup_s = sum(r["wall_seconds"] for r in runs.values())
    critical = (
        runs["plan"]["wall_seconds"] + max(r["wall_seconds"] for r in parts) + runs["collect"]["wall_seconds"]
    )
    # recall on sample rows against exact search
    rows = np.sort(np.random.default_rng(a.seed + 1).choice(n, min(a.sample, n), replace=False))
    exact_s, exact = faiss.knn(x[rows], x, a.k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    ex = np.where(exact == rows[:, None], -1, exact)
    ann = recall_at_k(stage_graph_sample(store, spec, planned, x, rows, a.k), ex)
    # the stage's stored edges above the threshold, for the sample rows
    from dinoflow.data.embeddings import get_npy

    got = {r: set() for r in rows.tolist()}
    for p in range(a.partitions):
        where = spec.out("parts", f"part-{p:05d}")
        q, j = get_npy(store, f"{where}/edges-q.npy"), get_npy(store, f"{where}/edges-j.npy")
        m = np.isin(q, rows) & (q != j)
        for qq, jj in zip(q[m].tolist(), j[m].tolist(), strict=True):
            got[qq].add(jj)
    want = [
        (int(r), int(e))
        for r, ids_, ss in zip(rows, ex, exact_s, strict=True)
        for e, s in zip(ids_, ss, strict=True)
        if e >= 0 and s > a.threshold_cos
    ]
    edge_recall = sum(e in got[r] for r, e in want) / len(want) if want else None
    # planted copies grouped with their source in the stage's output
    res = store.read_success(spec.output_uri)["result"]
    groups = pq.read_table(store.cached(res["groups_uri"])).to_pydict()
    group = dict(zip(groups["key"], groups["group"], strict=True))
    dup = np.flatnonzero(copy_of >= 0)
    same = [group.get(f"r{i:08d}", -1) == group.get(f"r{copy_of[i]:08d}", -2) for i in dup]
    raw = raw_faiss(x, planned, a.k, rows, a.threads, spec.tune_queries)
    return {
        "data": kind,
        "n": n,
        "partitions": a.partitions,
        "dedup_seconds": round(dedup_s, 2),
        "critical_path_seconds": round(critical, 2),
        "phase_seconds": {k: round(v["wall_seconds"], 2) for k, v in runs.items()},
        "raw_faiss_seconds": round(raw["seconds"], 2),
        "stage_over_raw": round(dedup_s / max(raw["seconds"], 1e-9), 3),
        "index": planned["kind"],
        "nlist": planned["nlist"],
        "nprobe": planned["nprobe"],
        "nprobe_sweep": planned["tuning"],
        "nlist_sweep": planned.get("nlist_sweep", []),
        "ann_recall": round(ann, 4),
        "raw_faiss_recall": round(recall_at_k(raw["ids"], ex), 4),
        "edge_recall_above_threshold": None if edge_recall is None else round(edge_recall, 4),
        "dup_recall": round(float(np.mean(same)), 4) if len(dup) else None,
        "kept": res["kept_count"],
        "peak_rss_part_gib": round(max(r["peak_rss_gib"] for r in parts), 3),
        "peak_rss_plan_gib": round(runs["plan"]["peak_rss_gib"], 3),
        "peak_rss_collect_gib": round(runs["collect"]["peak_rss_gib"], 3),
        "write_seconds": round(write_s, 2),
        "threads": a.threads,
    }


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        _child(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="dinoflow bench dedup-scale", description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated pool sizes")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=64, help="neighbours per image (DINOv2: 64)")
    ap.add_argument("--threshold-cos", type=float, default=0.6, help="edge threshold (DINOv2: 0.6)")
    ap.add_argument("--exact-max-pool", type=int, default=50_000)
    ap.add_argument("--recall-target", type=float, default=0.95, help="what the stage tunes nprobe for")
    ap.add_argument("--partitions", type=int, default=4, help="parts of the stage (its parallel tasks)")
    ap.add_argument("--sample", type=int, default=1000, help="queries for the recall figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="clustered", help="comma-separated: clustered, uniform")
    a = ap.parse_args(argv)
    import tempfile

    from ._store import bench_store

    home = None
    if "DINOFLOW_HOME" not in os.environ:  # the phases' local caches, removed at the end
        home = os.environ["DINOFLOW_HOME"] = tempfile.mkdtemp(prefix="dinoflow-bench-dedup-scale-")
    rows = []
    print(
        f"{'data':>9} {'n':>9} {'index':>5} {'nprobe':>6} {'stage_s':>8} {'raw_s':>8} {'ann_rec':>8} "
        f"{'raw_rec':>8} {'edge_rec':>8} {'dup_rec':>8} {'part_GiB':>8}"
    )
    try:
        with bench_store() as store:
            for kind in a.data.split(","):
                for n in [int(s) for s in a.sizes.split(",")]:
                    rows.append(_report(run_one(store, a, n, kind)))
    finally:
        if home:
            import shutil

            shutil.rmtree(home, ignore_errors=True)
    _summary(a, rows)


def _report(r: dict) -> dict:
    print(
        f"{r['data']:>9} {r['n']:>9} {r['index']:>5} {r['nprobe']:>6} {r['dedup_seconds']:>8} "
        f"{r['raw_faiss_seconds']:>8} {r['ann_recall']:>8} {r['raw_faiss_recall']:>8} "
        f"{r['edge_recall_above_threshold']!s:>8} {r['dup_recall']!s:>8} {r['peak_rss_part_gib']:>8}",
        flush=True,
    )
    print("  nlist sweep:", r["nlist_sweep"], flush=True)
    print("  nprobe sweep:", r["nprobe_sweep"], "phases:", r["phase_seconds"], flush=True)
    return r


def _summary(a, rows: list[dict]) -> None:
    first_kind = a.data.split(",")[0]
    mine = [r for r in rows if r["data"] == first_kind]
    last = mine[-1]
    uni = [r for r in rows if r["data"] == "uniform" and r["n"] == last["n"]]
    print(
        json.dumps(
            {
                "dedup_1m_seconds": last["dedup_seconds"] if last["n"] >= 1_000_000 else None,
                "raw_faiss_seconds": last["raw_faiss_seconds"],
                "raw_faiss_recall": last["raw_faiss_recall"],
                "stage_over_raw": last["stage_over_raw"],
                "partitions": a.partitions,
                "largest_n": last["n"],
                "largest_seconds": last["dedup_seconds"],
                "critical_path_seconds": last["critical_path_seconds"],
                "ann_recall": last["ann_recall"],
                "recall_target": a.recall_target,
                "nlist": last["nlist"],
                "nprobe": last["nprobe"],
                "nlists_tried": [t["nlist"] for t in last["nlist_sweep"]],
                "edge_recall_above_threshold": last["edge_recall_above_threshold"],
                "dup_recall_planted": last["dup_recall"],
                "peak_rss_part_gib": last["peak_rss_part_gib"],
                "ann_recall_uniform": uni[0]["ann_recall"] if uni else None,
                "threads": a.threads,
                "dim": a.dim,
                "k": a.k,
                "time_growth_ratio": round(last["dedup_seconds"] / max(mine[0]["dedup_seconds"], 1e-9), 2),
                "size_growth_ratio": round(last["n"] / mine[0]["n"], 2),
                "runs": rows,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
