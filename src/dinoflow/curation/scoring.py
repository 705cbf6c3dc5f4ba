"""Scores against the demo pool's ground truth (benchmarks and tests only; stages never read it).

* copy recall: share of planted copies whose component also holds their original (per transform).
* dup precision: share of images removed as duplicates whose kept representative belongs to the
  same ground-truth family (an original and all its planted copies).
* contamination recall: share of planted copies of evaluation images that are not kept.
* contamination precision: share of images dropped for contamination that are planted copies of
  evaluation images.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa


def score_dedup(gt: pa.Table, manifest_keys: list[str], kept_keys: list[str], groups: pa.Table) -> dict:
    keys = np.asarray(gt.column("key").to_pylist(), dtype=object)
    pos = {k: i for i, k in enumerate(keys)}
    if set(manifest_keys) != set(pos):
        raise ValueError("ground truth and manifest hold different keys")
    n = len(keys)
    copy_of = np.array([pos[c] if c else -1 for c in gt.column("copy_of").to_pylist()], np.int64)
    family = np.where(copy_of >= 0, copy_of, np.arange(n))
    transform = np.asarray(gt.column("transform").to_pylist(), dtype=object)
    contam = np.asarray(gt.column("contamination_of").to_numpy(), np.int64) >= 0
    kept = np.zeros(n, bool)
    kept[[pos[k] for k in kept_keys]] = True
    group = np.full(n, -1, np.int64)
    reason = np.full(n, "kept", dtype=object)
    rep = np.full(n, -1, np.int64)
    for k, g, r, why in zip(
        groups.column("key").to_pylist(),
        groups.column("group").to_pylist(),
        groups.column("representative").to_pylist(),
        groups.column("reason").to_pylist(),
        strict=True,
    ):
        i = pos[k]
        group[i], reason[i], rep[i] = g, why, pos[r] if r else -1
    singleton = group < 0
    group[singleton] = -(np.flatnonzero(singleton) + 2)  # unique negative ids for singletons

    is_copy = copy_of >= 0
    linked = is_copy & (group == group[np.maximum(copy_of, 0)])
    per_t: dict[str, dict[str, float]] = defaultdict(dict)
    for t in sorted(set(transform[is_copy].tolist())):
        m = is_copy & (transform == t)
        per_t[t]["copy_recall"] = round(float(linked[m].mean()), 4)
        per_t[t]["count"] = int(m.sum())
    removed_dup = np.isin(reason, ["exact", "phash", "embedding"])
    correct = removed_dup & (rep >= 0) & (family == family[np.maximum(rep, 0)])
    for t in per_t:
        m = removed_dup & is_copy & (transform == t)
        per_t[t]["removed_as_dup"] = int(m.sum())
    dropped_c = reason == "contamination"
    for t in sorted(set(transform[contam].tolist())):
        m = contam & (transform == t)
        per_t[f"contamination:{t}"] = {"recall": round(float((~kept[m]).mean()), 4), "count": int(m.sum())}
    return {
        "dup_precision": round(float(correct.sum() / max(1, removed_dup.sum())), 4),
        "dup_recall": round(float(linked.sum() / max(1, is_copy.sum())), 4),
        "contamination_recall": round(float((~kept[contam]).mean()) if contam.any() else 0.0, 4),
        "contamination_precision": round(float(contam[dropped_c].mean()) if dropped_c.any() else 0.0, 4),
        "removed_as_duplicate": int(removed_dup.sum()),
        "dropped_for_contamination": int(dropped_c.sum()),
        "planted_copies": int(is_copy.sum()),
        "planted_contamination": int(contam.sum()),
        "per_transform": dict(per_t),
    }
