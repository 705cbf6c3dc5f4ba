"""PartitionIndex.search follows ties only above ``min_sim``: a blank image's zero pixel descriptor
ties with every pool row at cosine 0, and following that tie grew a 60k-pool dedup part's result
arrays to [65536 queries x 60000] (killed by the OOM killer in `make demo`)."""

from __future__ import annotations

import numpy as np

from dinoflow.curation import partition as pt


def _pool(n: int = 3000, blanks: int = 20, twins: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[:blanks] = 0.0  # zero vectors: cosine 0 with everything
    x[blanks : blanks + twins] = x[blanks]  # one group of identical rows (cosine 1)
    return x


def test_ties_below_min_sim_are_not_followed_and_ties_above_are():
    x = _pool()
    index = pt.PartitionIndex(x, 0, pt.CoarsePlan("flat", x.shape[1], "test"))
    k = 5
    s_all, i_all = index.search(x, k)  # no floor: the blanks' tie at 0 runs to the whole pool
    assert s_all.shape[1] == len(x)
    s, i = index.search(x, k, min_sim=0.9)
    # the identical group's ties above the floor are still followed: all 30 twins are found...
    twins = set(range(20, 50))
    assert all(twins <= set(i[q][s[q] > 0.9].tolist()) for q in range(20, 50))
    # ...and nothing else grows the result past the next power-of-two step of that group
    assert s.shape[1] <= 64
    # above the floor, the floor changes nothing: the same neighbours as without it
    for q in range(len(x)):
        assert set(i[q][s[q] > 0.9].tolist()) == set(i_all[q][s_all[q] > 0.9].tolist()), q
