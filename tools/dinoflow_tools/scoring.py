"""Scores against the demo pool's ground truth (benchmarks and tests only; stages never read it).

The pool's base images hold no near-duplicate pair and no near-copy of an evaluation image (see
dinoflow_tools.pool), so the ground truth's families (an original and its planted copies) are
the only true duplicates:

* copy recall: share of planted copies whose group also holds their original (per transform).
* dup precision: share of images removed as duplicates whose kept representative belongs to the
  same family.
* contamination recall: share of planted copies of evaluation images that are not kept.
* contamination precision: share of images dropped for contamination that are planted copies of
  evaluation images.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

DUP_RULES = ["exact", "phash", "embedding"]


def score_arrays(
    copy_of: np.ndarray,
    transform: np.ndarray,
    contam: np.ndarray,
    source: np.ndarray,
    kept: np.ndarray,
    group: np.ndarray,
    reason: np.ndarray,
    rep: np.ndarray,
) -> dict:
    """Scores from row-aligned arrays: ground truth (copy_of row or -1, transform, contamination
    mask, source) and the dedup outcome (kept mask, group id, reason, representative row or -1)."""
    n = len(copy_of)
    family = np.where(copy_of >= 0, copy_of, np.arange(n))
    is_copy = copy_of >= 0
    linked = is_copy & (group == group[np.maximum(copy_of, 0)])
    per_t: dict[str, dict[str, float]] = defaultdict(dict)
    removed_dup = np.isin(reason, DUP_RULES)
    for t in sorted(set(transform[is_copy].tolist())):
        m = is_copy & (transform == t)
        per_t[t]["copy_recall"] = round(float(linked[m].mean()), 4)
        per_t[t]["count"] = int(m.sum())
        per_t[t]["removed_as_dup"] = int((removed_dup & m).sum())
    correct = removed_dup & (rep >= 0) & (family == family[np.maximum(rep, 0)])
    dropped_c = reason == "contamination"
    for t in sorted(set(transform[contam].tolist())):
        m = contam & (transform == t)
        per_t[f"contamination:{t}"] = {"recall": round(float((~kept[m]).mean()), 4), "count": int(m.sum())}
    wrong = removed_dup & ~correct
    false_c = dropped_c & ~contam
    per_source = {
        s: {
            "wrong_dup_removals": int((wrong & (source == s)).sum()),
            "wrong_contam_drops": int((false_c & (source == s)).sum()),
        }
        for s in sorted(set(source.tolist()))
    }
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
        "errors_per_source": per_source,
    }


def score_outcome(g: dict[str, np.ndarray], out) -> dict:
    """``score_arrays`` of ground-truth arrays ``g`` (``ground_truth_arrays``) and a
    ``dinoflow.curation.dedup`` outcome (keep, labels, reason, representative)."""
    return score_arrays(
        g["copy_of"],
        g["transform"],
        g["contam"],
        g["source"],
        out.keep,
        out.labels,
        out.reason,
        out.representative,
    )


def ground_truth_arrays(gt: pa.Table, manifest_keys: list[str]) -> dict[str, np.ndarray]:
    """Ground truth aligned with ``manifest_keys`` (the pool manifest's row order)."""
    keys = gt.column("key").to_pylist()
    pos = {k: i for i, k in enumerate(keys)}
    if set(manifest_keys) != set(pos) or len(manifest_keys) != len(keys):
        raise ValueError("ground truth and manifest hold different keys")
    take = np.array([pos[k] for k in manifest_keys], np.int64)
    row_of = {k: i for i, k in enumerate(manifest_keys)}
    copy_of = np.array([row_of[c] if c else -1 for c in gt.column("copy_of").to_pylist()], np.int64)[take]
    return {
        "copy_of": copy_of,
        "transform": np.asarray(gt.column("transform").to_pylist(), dtype=object)[take],
        "contam": (np.asarray(gt.column("contamination_of").to_numpy(), np.int64) >= 0)[take],
        "source": np.asarray(gt.column("source").to_pylist(), dtype=object)[take],
    }


def outcome_arrays(manifest_keys: list[str], kept_keys: list[str], groups: pa.Table) -> dict[str, np.ndarray]:
    """A dedup stage's outputs (kept manifest keys and groups table) as row-aligned arrays: kept
    mask, group id (singletons get unique negative ids), reason and representative row (-1: none)."""
    pos = {k: i for i, k in enumerate(manifest_keys)}
    n = len(manifest_keys)
    kept = np.zeros(n, bool)
    kept[[pos[k] for k in kept_keys]] = True
    group = np.full(n, -1, np.int64)
    reason = np.full(n, "kept", dtype=object)
    rep = np.full(n, -1, np.int64)
    for k, gid, r, why in zip(
        groups.column("key").to_pylist(),
        groups.column("group").to_pylist(),
        groups.column("representative").to_pylist(),
        groups.column("reason").to_pylist(),
        strict=True,
    ):
        i = pos[k]
        group[i], reason[i], rep[i] = gid, why, pos[r] if r else -1
    singleton = group < 0
    group[singleton] = -(np.flatnonzero(singleton) + 2)  # unique negative ids for singletons
    return {"kept": kept, "group": group, "reason": reason, "rep": rep}


def score_dedup(gt: pa.Table, manifest_keys: list[str], kept_keys: list[str], groups: pa.Table) -> dict:
    """Scores of a dedup stage's outputs (kept manifest keys and groups table)."""
    g = ground_truth_arrays(gt, manifest_keys)
    o = outcome_arrays(manifest_keys, kept_keys, groups)
    return score_arrays(
        g["copy_of"], g["transform"], g["contam"], g["source"], o["kept"], o["group"], o["reason"], o["rep"]
    )
