"""Duplicate components and what survives them (DINOv2 Sec. 3, "deduplication" and "self-dedup").

Edges come from rules, strongest first: ``exact`` (same content hash), ``phash`` (perceptual hashes
within a few bits) and ``embedding`` (k-NN graph edges above a cosine threshold). Their union gives
connected components (union-find). The keep rule, one image per component:

    the image with the largest pixel area (the least degraded copy is usually the largest);
    ties broken by the earliest row in the manifest (deterministic, order-stable).

Decontamination: a pool image within ``decontam_threshold_cos`` of an evaluation image (or with
the same content/perceptual hash) touches the evaluation set; its whole component is dropped,
kept representative included, because any member may carry the evaluation image's content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dinoflow.curation.unionfind import UnionFind

RULES = ("exact", "phash", "embedding")


@dataclass
class DedupOutcome:
    labels: np.ndarray  # int64 [n]: component id
    keep: np.ndarray  # bool [n]
    representative: np.ndarray  # int64 [n]: kept row of the component (-1: component dropped)
    reason: np.ndarray  # object [n]: "kept", a rule name, or "contamination"
    edges_per_rule: dict[str, int] = field(default_factory=dict)
    contaminated_rows: int = 0

    @property
    def n_components(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def groups(self) -> list[np.ndarray]:
        """Rows of every component with more than one member."""
        order = np.argsort(self.labels, kind="stable")
        lab = self.labels[order]
        cuts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1], True])
        return [order[s:e] for s, e in zip(cuts[:-1], cuts[1:], strict=True) if e - s > 1]


def select_representatives(labels: np.ndarray, area: np.ndarray | None = None) -> np.ndarray:
    """Kept row of each row's component: largest ``area``, then earliest row."""
    n = len(labels)
    area = np.zeros(n, np.int64) if area is None else np.asarray(area, np.int64)
    rows = np.arange(n)
    order = np.lexsort((rows, -area, labels))  # by component, area desc, row asc
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    rep_of_label = np.empty(int(labels.max()) + 1 if n else 0, np.int64)
    rep_of_label[labels[order][first]] = order[first]
    return rep_of_label[labels]


def dedup(
    n: int,
    edges: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    area: np.ndarray | None = None,
    touched_eval: np.ndarray | None = None,
) -> DedupOutcome:
    """Components of the union of ``edges`` (rule -> (a, b)), one kept per component, and the
    components that touch an evaluation set (``touched_eval``: pool rows) dropped whole."""
    unknown = set(edges) - set(RULES)
    if unknown:
        raise ValueError(f"unknown dedup rule(s) {sorted(unknown)}; known: {RULES}")
    uf = UnionFind(n)
    reason = np.full(n, "kept", dtype=object)
    strongest = np.full(n, len(RULES), np.int64)
    counts = {}
    for r, rule in enumerate(RULES):
        a, b = edges.get(rule, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        counts[rule] = int(len(a))
        uf.union_pairs(a, b)
        for side in (a, b):
            np.minimum.at(strongest, side, r)
    labels = uf.labels()
    rep = select_representatives(labels, area) if n else np.zeros(0, np.int64)
    keep = rep == np.arange(n)
    dropped = ~keep
    reason[dropped] = np.array(RULES + ("embedding",), dtype=object)[strongest[dropped]]
    n_contam = 0
    if touched_eval is not None and len(touched_eval):
        bad = np.zeros(int(labels.max()) + 1, bool)
        bad[labels[np.asarray(touched_eval, np.int64)]] = True
        hit = bad[labels]
        n_contam = int(hit.sum())
        keep &= ~hit
        rep = np.where(hit, -1, rep)
        reason[hit] = "contamination"
    return DedupOutcome(labels, keep, rep, reason, counts, n_contam)
