"""Curation that fans out: partitioned k-NN search with one coarse quantizer equals one index over
the whole pool, nprobe is chosen for a recall target, and the dedup / curate / embed stages give the
same output whatever the number of parts (run in-process here; through kfp.local in
test_pipeline_fanout)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from dinoflow.curation import partition as pt
from dinoflow.curation.knn import recall_at_k
from dinoflow.stages import get_stage


def _clustered(n=6000, d=24, centres=60, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, d))
    x[100:120] = x[7]  # a group of exact duplicates, larger than the tie margin
    x[200:260] = x[:60] + 0.01 * rng.normal(size=(60, d))  # near-duplicates
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)  # as the embed stage stores them


def _partitioned(x, plan, parts, k, lists=None):
    found = []
    for p in range(parts):
        lo, hi = pt.part_range(len(x), parts, p)
        own = None if lists is None else lists[lo:hi, 0]
        found.append(pt.PartitionIndex(x[lo:hi], lo, plan, own_lists=own).search(x, k, lists))
    return pt.merge_topk(found, k)


def test_part_ranges_cover_every_row_once_in_whole_batches():
    for n, parts, align in ((1000, 3, 64), (10, 4, 1), (5, 7, 2), (1, 1, 256)):
        ranges = [pt.part_range(n, parts, p, align) for p in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(lo % align == 0 for lo, _ in ranges)
    with pytest.raises(ValueError, match="not one of"):
        pt.part_range(10, 2, 2)


@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_partitions_on_one_quantizer_give_one_index_result_whatever_their_number(kind):
    import faiss

    x = _clustered()
    cents = pt.train_coarse(x[::2], 40) if kind == "ivf" else None
    plan = pt.CoarsePlan(kind, x.shape[1], "test", 40 if kind == "ivf" else 0, 6, cents)
    lists = pt.assign(cents, x, 6)[1] if kind == "ivf" else None
    one = _partitioned(x, plan, 1, 11, lists)
    three = _partitioned(x, plan, 3, 11, lists)
    five = _partitioned(x, plan, 5, 11, None)  # the partitions' own coarse search: the same lists
    for other in (three, five):
        assert np.array_equal(one[1], other[1]) and np.array_equal(one[0], other[0])
    # the 20 identical rows tie at cosine 1: the lowest rows win, whatever the partitioning
    assert one[1][100].tolist()[:11] == [7, *range(100, 110)]
    if kind == "ivf":  # the same neighbours as one faiss index over the whole pool
        q = faiss.IndexFlatIP(x.shape[1])
        q.add(cents)
        ivf = faiss.IndexIVFFlat(q, x.shape[1], 40, faiss.METRIC_INNER_PRODUCT)
        ivf.add(x)
        ivf.nprobe = 6
        s, i = ivf.search(x, 12)
        untied = s[:, 10] > s[:, 11] + 1e-6  # faiss keeps an arbitrary member of a tie at the cut
        assert untied.mean() > 0.95
        assert all(set(a) == set(b) for a, b in zip(one[1][untied], i[untied, :11], strict=True))


def test_preassigned_search_splits_queries_over_threads_with_the_same_result():
    """faiss's default parallel mode runs ``search_preassigned`` on one thread (its ``search`` splits
    the queries before calling it): a dedup part used one core of two. Mode 3 splits them inside;
    the neighbours must not depend on the number of threads."""
    import faiss

    x = _clustered()
    cents = pt.train_coarse(x[::2], 40)
    plan = pt.CoarsePlan("ivf", x.shape[1], "test", 40, 6, cents)
    lists = pt.assign(cents, x, 6)[1]
    index = pt.PartitionIndex(x[:3000], 0, plan, own_lists=lists[:3000, 0])
    before = faiss.omp_get_max_threads()
    try:
        got = {}
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            got[threads] = index.search(x, 11, lists)
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(got[1][1], got[2][1]) and np.array_equal(got[1][0], got[2][0])


@pytest.mark.parametrize("range_pairs", [pt.RANGE_PAIRS, 3000])
def test_edges_above_a_threshold_by_range_search_are_the_top_k_searchs(monkeypatch, range_pairs):
    """Dedup's parts keep each row's k best edges above the threshold by a range search (no top-k
    heap); merged over the parts they must be the edges above the threshold of the merged top-k,
    ties (a group of 20 identical rows, more than k) broken by row as the top-k search breaks them,
    in query blocks of any size (``range_pairs`` 3,000: a few queries per call)."""
    monkeypatch.setattr(pt, "RANGE_PAIRS", range_pairs)
    x = _clustered()
    k, threshold, parts = 11, 0.6, 3
    cents = pt.train_coarse(x[::2], 40)
    plan = pt.CoarsePlan("ivf", x.shape[1], "test", 40, 6, cents)
    lists = pt.assign(cents, x, 6)[1]
    s, i = _partitioned(x, plan, parts, k + 1, lists)
    r, c = np.nonzero((s > threshold) & (i >= 0))
    want = pt.merge_edges(r, i[r, c], s[r, c], k)
    got = {"range": [], "top-k": []}
    for p in range(parts):
        lo, hi = pt.part_range(len(x), parts, p)
        index = pt.PartitionIndex(x[lo:hi], lo, plan, own_lists=lists[lo:hi, 0])
        got["range"].append(index.edges_above(x[:2500], 0, threshold, k, lists[:2500]))
        got["range"].append(index.edges_above(x[2500:], 2500, threshold, k, lists[2500:]))
        got["top-k"].append(index.edges_above(x, 0, threshold, k))  # no lists: the top-k path
    assert len(want[0]) > len(x)  # clustered rows have neighbours above 0.6, not only the copies
    for how, edges in got.items():
        merged = pt.merge_edges(*(np.concatenate(a) for a in zip(*edges, strict=True)), k)
        for a, b in zip(merged, want, strict=True):
            assert np.array_equal(a, b), how
    # the 20 identical rows: each keeps the k lowest others, at cosine 1
    q, j, _ = want
    assert j[q == 100].tolist() == [7, *range(101, 111)]


def test_range_blocks_bound_each_blocks_possible_matches():
    bounds = np.array([5, 5, 5, 30, 1, 1, 1, 1, 2, 0, 0, 7])
    blocks = pt.range_blocks(bounds, 10, 3)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(bounds)
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    for lo, hi in blocks:
        assert hi - lo <= 3
        assert bounds[lo:hi].sum() <= 10 or hi - lo == 1  # a query above the budget goes alone
    assert (3, 4) in blocks  # the 30
    assert pt.range_blocks(np.zeros(0, np.int64), 10, 3) == []


def test_list_parts_give_every_list_to_one_part_in_runs_balanced_by_rows():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 50, 5000) ** 2 // 50  # uneven list sizes; some lists empty
    owner = pt.list_parts(first, 50, 4)
    assert owner.shape == (50,) and set(owner.tolist()) == {0, 1, 2, 3}
    assert np.all(np.diff(owner) >= 0)  # contiguous runs of list ids
    rows = np.bincount(owner[first], minlength=4)
    assert rows.sum() == 5000 and rows.max() - rows.min() <= 2 * np.bincount(first).max()
    assert pt.list_parts(first, 50, 1).tolist() == [0] * 50


def test_partitions_owning_whole_lists_give_the_one_index_result():
    """Dedup's parts own whole lists; a query's probes into other parts' lists are skipped (-1):
    merged, the partitions give the same top-k and edges as row-range partitions."""
    x = _clustered()
    cents = pt.train_coarse(x[::2], 40)
    plan = pt.CoarsePlan("ivf", x.shape[1], "test", 40, 6, cents)
    lists = pt.assign(cents, x, 6)[1]
    want = _partitioned(x, plan, 1, 11, lists)
    owner = pt.list_parts(lists[:, 0], 40, 3)
    found, edges = [], []
    for p in range(3):
        mine = np.flatnonzero(owner[lists[:, 0]] == p)
        index = pt.PartitionIndex(x[mine], 0, plan, own_lists=lists[mine, 0], ids=mine)
        probes = np.where(owner[lists] == p, lists, -1)
        found.append(index.search(x, 11, probes))
        edges.append(index.edges_above(x, 0, 0.6, 10, probes))
    got = pt.merge_topk(found, 11)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    r, c = np.nonzero((want[0] > 0.6) & (want[1] >= 0))
    want_edges = pt.merge_edges(r, want[1][r, c], want[0][r, c], 10)
    merged = pt.merge_edges(*(np.concatenate(a) for a in zip(*edges, strict=True)), 10)
    for a, b in zip(merged, want_edges, strict=True):
        assert np.array_equal(a, b)


def test_a_quantizer_refined_from_a_smaller_one_splits_its_lists():
    x = _clustered(8000, 32, 300, seed=2)
    small = pt.train_coarse(x, 40)
    big = pt.train_coarse(x, 100, init=small)
    assert big.shape == (100, 32) and np.allclose(np.linalg.norm(big, axis=1), 1, atol=1e-4)
    assert np.array_equal(big, pt.train_coarse(x, 100, init=small))  # deterministic
    fit = lambda c: float(pt.assign(c, x, 1)[0].mean())  # noqa: E731  mean cosine to the nearest centroid
    assert fit(big) > fit(small)
    with pytest.raises(ValueError, match="at least 100 sample rows"):
        pt.train_coarse(x[:50], 100, init=small)


def test_tune_ivf_climbs_the_list_counts_while_more_lists_pay():
    x = _clustered(8000, 32, 300, seed=1)
    held = np.arange(7000, 7500)
    trained = []

    def train(nlist, init):
        assert (init is None) == (not trained)  # each count after the first refines the previous one
        trained.append(nlist)
        return pt.train_coarse(x[:6400], nlist, init=init)

    args = (
        len(x),
        x[held],
        lambda: ((lo, x[lo : lo + 1500]) for lo in range(0, len(x), 1500)),
        lambda ids: x[ids],
        train,
        10,
        0.9,
    )
    t = pt.tune_ivf(*args, search_queries=len(x), query_rows=held, ladder=[10, 40, 160])
    sweep = t.nlist_sweep
    assert trained == [r["nlist"] for r in sweep] and len(sweep) >= 2  # 10 lists scan too much
    for r in sweep[:-1]:  # each step left because it missed the target or a larger count paid
        assert not r["reached"] or r["next_pays"]
    if len(sweep) < 3:
        assert sweep[-1]["reached"] and not sweep[-1]["next_pays"]
    best = min((r for r in sweep if r["reached"]), key=lambda r: r["search_gdots"])
    assert (t.nlist, t.nprobe) == (best["nlist"], best["nprobe"]) and len(t.centroids) == t.nlist
    assert t.tuning[-1]["nprobe"] <= t.nlist
    # a fixed count is trained once; its nprobe is still the fewest reaching the target
    trained.clear()
    fixed = pt.tune_ivf(*args, search_queries=len(x), query_rows=held, nlist=40)
    assert trained == [40] and fixed.nlist == 40
    assert fixed.nprobe == next(r["nprobe"] for r in fixed.tuning if r["recall"] >= 0.9)
    # the ladder: faiss's 4*sqrt(n) .. 16*sqrt(n), at least 39 rows per list
    assert pt.nlist_ladder(1_000_000) == [4000, 8000, 16000]
    assert pt.nlist_ladder(100_000) == [1264, 2529]  # 16*sqrt(n) would leave fewer than 39 rows a list


def test_nprobe_is_the_fewest_lists_that_reach_the_recall_target():
    x = _clustered(8000, 32, 300, seed=1)
    cents = pt.train_coarse(x[:6400], 100)
    queries = np.arange(6400, 6900)
    target = 0.9
    nprobe, sweep = pt.tune_nprobe(
        x[queries],
        lambda: ((lo, x[lo : lo + 1500]) for lo in range(0, len(x), 1500)),
        lambda ids: x[ids],
        cents,
        10,
        target,
        query_rows=queries,
    )
    assert [r["nprobe"] for r in sweep] == sorted(r["nprobe"] for r in sweep)
    assert sweep[-1]["recall"] >= target > sweep[0]["recall"]  # a real choice, not the first step
    assert nprobe == next(r["nprobe"] for r in sweep if r["recall"] >= target)
    # the estimate is exact for IVF-Flat: a search with that nprobe measures the same recall
    plan = pt.CoarsePlan("ivf", x.shape[1], "t", 100, nprobe, cents)
    _, found = pt.PartitionIndex(x, 0, plan).search(x[queries], 11)
    _, exact = pt.exact_topk(x[queries], [(0, x)], 11)
    drop = lambda ids: np.where(ids == queries[:, None], -1, ids)  # noqa: E731
    measured = recall_at_k(drop(found[:, :11]), drop(exact))
    estimated = next(r["recall"] for r in sweep if r["nprobe"] == nprobe)
    assert measured == pytest.approx(estimated, abs=0.01)


def test_nprobe_keeps_every_edge_above_the_threshold_with_a_step_of_margin():
    recall = {n: min(1.0, 0.9 + 0.02 * n) for n in range(1, 33)}
    assert pt.choose_nprobe(recall, 0.95, 100)[0] == 4  # 0.98 at 4, 0.94 at 2
    edges = {n: 1.0 if n >= 8 else 0.99 for n in range(1, 33)}
    nprobe, table = pt.choose_nprobe(recall, 0.95, 100, edges)
    assert nprobe == 12 and table[0]["edge_recall"] == 0.99  # all edges from 8 on; one step more
    assert pt.choose_nprobe(recall, 0.95, 100, {n: 1.0 for n in range(1, 33)})[0] == 4


def test_gpu_index_is_chosen_when_faiss_sees_a_gpu(monkeypatch):
    """faiss-cpu here: the selection logic only (the GPU build's calls are recorded, not run)."""
    import faiss

    x = _clustered(600, 8, 10)
    plan = pt.CoarsePlan("ivf", 8, "t", 4, 2, pt.train_coarse(x, 4))
    assert not pt.gpu_wanted() and not pt.PartitionIndex(x, 0, plan).on_gpu
    moved, params = [], []

    class GpuParameterSpace:
        def set_index_parameter(self, index, name, value):
            params.append((name, value))

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index)
    monkeypatch.setattr(faiss, "GpuParameterSpace", GpuParameterSpace, raising=False)
    assert pt.gpu_wanted() and not pt.gpu_wanted(use_gpu=False)
    index = pt.PartitionIndex(x, 0, plan, own_lists=pt.assign(plan.centroids, x, 1)[1][:, 0])
    assert index.on_gpu and len(moved) == 1 and params == [("nprobe", 2)]
    # on the GPU the index runs its own coarse search: the (wrong) precomputed lists are not used
    s, i = index.search(x[300:305], 3, probes=np.zeros((5, 2), np.int64))
    assert (i[:, 0] == np.arange(300, 305)).all()


def test_merge_edges_keeps_each_querys_k_best_without_itself():
    q = np.array([0, 0, 0, 0, 1, 1, 1])
    j = np.array([0, 3, 2, 5, 4, 6, 5])
    s = np.array([1.0, 0.9, 0.9, 0.8, 0.7, 0.7, 0.95], np.float32)
    mq, mj, ms = pt.merge_edges(q, j, s, 2)
    assert mq.tolist() == [0, 0, 1, 1] and mj.tolist() == [2, 3, 5, 4]


# -- the stages, in-process: parts=1 and parts=3 write the same output -----------------------------
@pytest.fixture(scope="module")
def pool(store, tmp_path_factory):
    """300 small images through ingest, with clustered embeddings (exact and near duplicates)."""
    import uuid

    from PIL import Image

    from dinoflow.data.embeddings import write_embeddings

    folder = tmp_path_factory.mktemp("fanout-pool")
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (8 + i % 5, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    root = f"s3://fanout-{uuid.uuid4().hex[:10]}"
    ingest = get_stage("ingest")
    manifest = ingest.run(
        ingest.parse_spec(
            {
                "output_uri": f"{root}/ingest",
                "kind": "folder",
                "splits": {"all": [str(folder)]},
                "source": "t",
            }
        ),
        store,
    ).manifests["all"]
    x = _clustered(300, 16, 12, seed=3)
    write_embeddings(store, f"{root}/emb", x, meta={"manifest_uri": manifest}, rows_per_shard=70)
    write_embeddings(store, f"{root}/seed-emb", x[:10] + 0.01, meta={"manifest_uri": manifest})
    return {"root": root, "manifest": manifest}


def _keys(store, uri):
    from dinoflow.data.manifest import read_manifest

    return read_manifest(store, uri).column("key").to_pylist()


def test_dedup_with_three_parts_keeps_what_one_part_keeps(store, pool):
    stage = get_stage("dedup")
    base = {
        "manifest_uri": pool["manifest"],
        "embeddings_uri": f"{pool['root']}/emb",
        "k": 8,
        "threshold_cos": 0.9,
        "index": "ivf",
        "center": True,
    }
    res = [
        stage.run(stage.parse_spec({**base, "output_uri": f"{pool['root']}/d{p}", "parts": p}), store)
        for p in (1, 3)
    ]
    assert res[0].index_kind == "ivf" and res[0].nprobe >= 1 and res[1].parts == 3
    assert 0 < res[0].removed_per_rule["embedding"] and res[0].kept_count < 300
    assert _keys(store, res[0].manifest_uri) == _keys(store, res[1].manifest_uri)
    groups = [pq.read_table(io.BytesIO(store.get_bytes(r.groups_uri))).to_pylist() for r in res]
    assert groups[0] == groups[1]
    report = store.get_json(res[1].report_uri)["index"]
    assert report["parts"] == 3 and report["nprobe_sweep"][-1]["recall"] >= 0.95
    assert report["nlist_sweep"] and report["nlist_sweep"][-1]["nlist"] >= 1  # the list counts tried


def test_curate_retrieval_with_three_parts_selects_what_one_part_selects(store, pool):
    stage = get_stage("curate")
    base = {
        "manifest_uri": pool["manifest"],
        "embeddings_uri": f"{pool['root']}/emb",
        "seed_manifest_uris": [pool["manifest"]],
        "seed_embeddings_uris": [f"{pool['root']}/seed-emb"],
        "target_size": 120,
        "exact_max_pool": 50,  # an IVF index even for this small pool
    }
    # 300 rows but 10 seeds: the seed manifest must match its embeddings
    from dinoflow.data.manifest import read_manifest, write_manifest

    seeds = f"{pool['root']}/seeds.parquet"
    write_manifest(store, seeds, read_manifest(store, pool["manifest"]).slice(0, 10))
    base["seed_manifest_uris"] = [seeds]
    res = [
        stage.run(stage.parse_spec({**base, "output_uri": f"{pool['root']}/c{p}", "parts": p}), store)
        for p in (1, 3)
    ]
    assert res[0].count == res[1].count == 120
    assert _keys(store, res[0].manifest_uri) == _keys(store, res[1].manifest_uri)
    report = store.get_json(res[1].report_uri)
    assert report["index"]["kind"] == "ivf" and report["index"]["parts"] == 3


def test_stage_phases_run_once_and_a_part_outside_the_spec_is_refused(store, pool):
    from dinoflow.errors import SpecError

    stage = get_stage("dedup")
    spec = stage.parse_spec(
        {
            "output_uri": f"{pool['root']}/phases",
            "manifest_uri": pool["manifest"],
            "embeddings_uri": f"{pool['root']}/emb",
            "k": 8,
            "threshold_cos": 0.9,
            "parts": 2,
        }
    )
    planned = stage.run_phase(spec, store, "plan")
    part = stage.run_phase(spec, store, "part", 1)
    assert planned["kind"] == "flat" and part["rows"] == [150, 300]
    assert stage.run_phase(spec, store, "part", 1)["seconds"] == part["seconds"]  # recorded, not rerun
    with pytest.raises(SpecError, match="part 2 is not one of the spec's 2 parts"):
        stage.run_phase(spec, store, "part", 2)
    with pytest.raises(SpecError, match="no fan-out phases"):
        get_stage("evaluate").run_phase(spec, store, "plan")
    res = stage.run(spec, store)  # collects: part 0 runs here, part 1 is reused
    assert res.parts == 2 and store.read_success(spec.out("parts", "part-00000")) is not None


def test_bench_dedup_scale_runs_small_and_matches_plain_faiss(store, s3_env, monkeypatch, capsys):
    import json

    from dinoflow_tools.bench import dedup_scale

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    argv = ["--sizes", "3000", "--dim", "16", "--k", "8", "--partitions", "2", "--sample", "100"]
    dedup_scale.main([*argv, "--exact-max-pool", "1000", "--threshold-cos", "0.9"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["partitions"] == 2 and figures["largest_n"] == 3000 and figures["nprobe"] >= 1
    # the same index settings as plain faiss: the same neighbours
    assert figures["ann_recall"] == pytest.approx(figures["raw_faiss_recall"], abs=0.01)
    assert figures["edge_recall_above_threshold"] == 1.0 and figures["raw_faiss_seconds"] > 0
    assert 0 < figures["peak_rss_part_gib"] < 1.5
