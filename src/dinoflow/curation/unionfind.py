"""Union-find (disjoint sets) for duplicate graphs: scalar operations and a vectorised bulk union.

The bulk path hooks every edge's larger root onto its smaller root with ``np.minimum.at`` and then
compresses paths by pointer jumping, repeated until no edge joins two roots. Each round at least
halves the number of cross-component edges in practice, so a few rounds handle millions of edges
without a Python loop per edge. Roots are always the smallest node id of their component.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over ``0..n-1``; a set's root is its smallest member."""

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"UnionFind needs n >= 0, got {n}")
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, a: int) -> int:
        p = self.parent
        root = int(a)
        while p[root] != root:
            root = int(p[root])
        while p[a] != root:  # path compression
            p[a], a = root, int(p[a])
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return lo

    def _compress(self) -> None:
        p = self.parent
        while True:
            gp = p[p]
            if np.array_equal(gp, p):
                return
            p[:] = gp

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union every pair ``(a[i], b[i])`` (vectorised)."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"union_pairs: {a.shape} and {b.shape} differ")
        if a.size == 0:
            return
        n = len(self.parent)
        if min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n:
            raise ValueError(f"union_pairs: node ids must lie in [0, {n})")
        self._compress()
        while True:
            ra, rb = self.parent[a], self.parent[b]
            cross = ra != rb
            if not cross.any():
                return
            ra, rb = ra[cross], rb[cross]
            a, b = a[cross], b[cross]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(self.parent, hi, lo)
            self._compress()

    def roots(self) -> np.ndarray:
        """Root (smallest member) of every node's set."""
        self._compress()
        return self.parent.copy()

    def labels(self) -> np.ndarray:
        """Component index per node, numbered 0.. in order of each component's smallest member."""
        _, lab = np.unique(self.roots(), return_inverse=True)
        return lab.astype(np.int64)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected graph with edges ``(a[i], b[i])``."""
    uf = UnionFind(n)
    uf.union_pairs(a, b)
    return uf.labels()
