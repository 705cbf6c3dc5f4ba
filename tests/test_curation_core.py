"""Pure curation parts: union-find, keep rule, faiss k-NN (exact vs IVF), pHash pairs, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.curation.dedup import dedup, select_representatives, star_groups
from dinoflow.curation.hashing import hash_pairs, phash64, reduce_for_hash
from dinoflow.curation.hkmeans import balanced_sample, hierarchical_kmeans
from dinoflow.curation.knn import choose_index, edges_above, knn_graph, knn_search, recall_at_k
from dinoflow.curation.retrieval import balanced_counts, cluster_sample, retrieve_topn
from dinoflow.curation.unionfind import UnionFind, connected_components


def _clustered(n, d, centers, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    lab = rng.integers(0, centers, n)
    x = (c[lab] + noise * rng.normal(size=(n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), lab


def test_union_find_scalar_and_bulk_agree():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    uf = UnionFind(500)
    for i, j in zip(a, b, strict=True):
        uf.union(int(i), int(j))
    bulk = connected_components(500, a, b)
    scalar = uf.labels()
    # same partition: labels map one to one
    pairs = set(zip(bulk.tolist(), scalar.tolist(), strict=True))
    assert len(pairs) == len(set(bulk.tolist())) == len(set(scalar.tolist()))
    assert uf.find(int(a[0])) == uf.find(int(b[0]))


def test_components_hand_built_graph():
    # 0-1-2 chain, 3-4, 5 alone, 6-7-6 cycle
    lab = connected_components(8, np.array([0, 1, 3, 6, 7]), np.array([1, 2, 4, 7, 6]))
    assert lab.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    with pytest.raises(ValueError):
        connected_components(3, np.array([0]), np.array([5]))


def test_keep_rule_largest_area_then_earliest_row():
    labels = np.array([0, 0, 0, 1, 1, 2])
    area = np.array([100, 400, 400, 9, 9, 1])
    assert select_representatives(labels, area).tolist() == [1, 1, 1, 3, 3, 5]


def test_dedup_reasons_and_decontamination_drops_whole_component():
    out = dedup(
        7,
        {"exact": (np.array([0]), np.array([1])), "embedding": (np.array([1, 3, 4]), np.array([2, 4, 5]))},
        touched_eval=np.array([5]),
        grouping="connected",
    )
    assert out.keep.tolist() == [True, False, False, False, False, False, True]
    assert out.reason.tolist() == ["kept", "exact", "embedding"] + ["contamination"] * 3 + ["kept"]
    assert out.contaminated_rows == 3
    assert [g.tolist() for g in out.groups()] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("grouping", ["star", "connected"])
def test_decontamination_spread_self_drops_the_touching_rows_only(grouping):
    edges = {"exact": (np.array([0]), np.array([1])), "embedding": (np.array([1, 3, 4]), np.array([2, 4, 5]))}
    out = dedup(7, edges, touched_eval=np.array([4]), grouping=grouping, spread="self")
    # 4 leaves the graph: 3 and 5 lose their link through it and both stay; 0-1-2 is untouched
    assert out.reason.tolist()[3:] == ["kept", "contamination", "kept", "kept"]
    assert out.keep.tolist()[3:] == [True, False, True, True] and out.contaminated_rows == 1
    assert out.representative[4] == -1 and out.reason[1] == "exact"
    with pytest.raises(ValueError, match="unknown contamination spread"):
        dedup(7, edges, touched_eval=np.array([4]), spread="component")


def test_index_choice_is_automatic_with_reason():
    small = choose_index(1000, 64, exact_max_pool=5000)
    big = choose_index(200_000, 64, exact_max_pool=5000)
    assert small.kind == "flat" and "exact" in small.reason
    assert big.kind == "ivf" and big.nlist > 1 and "5000" in big.reason


def test_ivf_agrees_with_exact_on_a_small_pool():
    x, _ = _clustered(4000, 32, 40)
    exact = knn_graph(x, 10, force="flat")
    approx = knn_graph(x, 10, force="ivf", nprobe=16)
    assert exact.choice.kind == "flat" and approx.choice.kind == "ivf"
    assert recall_at_k(approx.ids, exact.ids) > 0.9
    assert not (exact.ids == np.arange(len(x))[:, None]).any()  # self excluded
    q, nb, s = edges_above(exact, 0.9)
    assert (s > 0.9).all() and len(q) == len(nb)


def test_knn_search_checks_shapes():
    with pytest.raises(ValueError, match="one d"):
        knn_search(np.zeros((5, 4), np.float32), np.zeros((2, 3), np.float32), 1)


def test_phash_finds_mirror_and_near_copies_only():
    from dinoflow.data.idx import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    base = x[:300]
    copies = np.concatenate(
        [base[:20, :, ::-1], np.clip(base[20:40].astype(int) + 10, 0, 255).astype(np.uint8)]
    )
    h = phash64(reduce_for_hash(np.concatenate([base, copies])))
    i, j, bits = hash_pairs(h, 2)
    found = {(int(a), int(b)) for a, b in zip(i, j, strict=True)}
    planted = {(k, 300 + k) for k in range(40)}
    assert len(planted & found) >= 36
    ci, cj, _ = hash_pairs(h[:300], 0, other=h[300:])
    assert {(int(a), int(b)) for a, b in zip(ci, cj, strict=True)} >= {(k, k) for k in range(20)}


def test_balanced_counts_water_fills():
    assert balanced_counts(np.array([1, 10, 10]), 15).tolist() == [1, 7, 7]
    assert balanced_counts(np.array([3, 3]), 6).tolist() == [3, 3]
    with pytest.raises(ValueError):
        balanced_counts(np.array([1]), 2)


def test_hierarchical_kmeans_flattens_a_long_tail():
    rng = np.random.default_rng(1)
    sizes = [4000, 800, 150, 40]
    c = rng.normal(size=(4, 16))
    x = np.concatenate([c[i] + 0.25 * rng.normal(size=(s, 16)) for i, s in enumerate(sizes)]).astype(
        np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = np.repeat(np.arange(4), sizes)
    h = hierarchical_kmeans(x, [60, 12, 4], resample_steps=1)
    rows = balanced_sample(h, 400)
    assert len(rows) == 400 and len(np.unique(rows)) == 400
    got = np.bincount(lab[rows], minlength=4)
    assert got[3] >= 30  # the 0.8% concept gets ~10% of the sample (random sampling: ~3)
    assert got[2] + got[3] >= 45  # random sampling: ~15


def test_retrieval_and_cluster_sampling_follow_the_seeds():
    x, lab = _clustered(3000, 16, 12, seed=3)
    seeds = x[lab == 5][:40]
    rows, sims, _ = retrieve_topn(x, seeds, 150)
    assert len(rows) == 150 and (lab[rows] == 5).mean() > 0.95
    rows, info = cluster_sample(x, x[lab == 7][:3], 100, n_clusters=24)
    assert info["seed_clusters"] >= 1 and (lab[rows] == 7).mean() > 0.8


def test_star_groups_do_not_chain():
    # a chain 0-1-2-3-4-5 and a triangle 6-7-8: star groups remove only direct duplicates of a kept row
    a, b = np.array([0, 1, 2, 3, 4, 6, 7, 6]), np.array([1, 2, 3, 4, 5, 7, 8, 8])
    out = dedup(9, {"embedding": (a, b)})
    assert out.keep.tolist() == [True, False, True, False, True, False, True, False, False]
    assert (out.representative[[1, 3, 5]] == [0, 2, 4]).all() and (out.representative[[7, 8]] == 6).all()
    assert set(out.reason[~out.keep]) == {"embedding"}
    connected = dedup(9, {"embedding": (a, b)}, grouping="connected")
    assert connected.keep.sum() == 2  # the chain collapses to one image
    # decontamination drops the touching row's star (3 is a duplicate of 2), not the whole chain
    out = dedup(9, {"embedding": (a, b)}, touched_eval=np.array([3]))
    assert out.reason.tolist().count("contamination") == 2 and out.keep[[0, 4, 5]].tolist() == [
        True,
        True,
        False,
    ]
    connected = dedup(9, {"embedding": (a, b)}, touched_eval=np.array([3]), grouping="connected")
    assert connected.contaminated_rows == 6


def test_star_groups_keep_rule_and_strongest_rule():
    # 2 has the largest area: it is kept and claims 0 (by exact, the stronger of two edges) and 1
    rep, via = star_groups(
        4, np.array([0, 0, 2]), np.array([2, 2, 1]), np.array([2, 0, 2]), np.array([1, 2, 0, 3])
    )
    assert rep.tolist() == [2, 2, 2, 3] and via.tolist() == [0, 2, -1, -1]


def test_generated_base_has_no_near_duplicates():
    from dinoflow_tools.pool import DISTINCT_CORR, build_pool_arrays, near_pairs

    p = build_pool_arrays(600, eval_size=200, seed_size=50, contamination=20, seed=3)
    base = p.images[(p.copy_of < 0) & (p.contamination_of < 0)]
    copies = p.copy_of >= 0
    assert len(near_pairs(base)[0]) == 0 and len(near_pairs(base, other=p.eval_images)[0]) == 0
    # a mirrored base image is found as a pair; so are the planted pixel-preserving copies
    i, j = near_pairs(np.concatenate([base[:50], base[:50, :, ::-1]]))
    assert {(k, k + 50) for k in range(50) if base[k].std() > 0} <= set(
        zip(i.tolist(), j.tolist(), strict=True)
    )
    bright = copies & (p.transform == "brightness")
    pi, pj = near_pairs(p.images[bright], other=p.images[p.copy_of[bright]])
    assert (pi == pj).sum() >= 0.9 * bright.sum() and DISTINCT_CORR < 1
    assert sum(v > 0 for v in {s: (p.source == s).sum() for s in set(p.source)}.values()) == 5


def test_exact_pairs_star_every_copy_to_the_first_row():
    from dinoflow.curation.hashing import exact_match_rows, exact_matches, exact_pairs

    sha = np.array(["b", "a", "b", "c", "b", "a"], dtype=object)
    head, member = exact_pairs(sha)
    assert sorted(zip(head.tolist(), member.tolist(), strict=True)) == [(0, 2), (0, 4), (1, 5)]
    assert [len(x) for x in exact_pairs(np.array([], dtype=object))] == [0, 0]
    assert exact_matches(sha, np.array(["c", "z"])).tolist() == [False, False, False, True, False, False]
    # the matched row of the other set: its first row with that digest
    assert exact_match_rows(sha, np.array(["z", "c", "b", "c"])).tolist() == [2, -1, 2, 1, 2, -1]
    assert exact_match_rows(sha, np.array([], dtype=object)).tolist() == [-1] * 6
