"""``dinoflow demo``'s input and its curation report against the ground truth (entry points
``demo-input`` and ``demo-report`` of the ``dinoflow.tools`` group; the library never imports them).

The input is an uncurated mixed pool written to the object store as tar shards, ingested by the
pipeline like any other dataset:

* ``pool``: Fashion-MNIST train images (unlabelled) mixed with glyphs, photo crops, handwritten
  digits and icons, planted near-duplicates and planted copies of Fashion-MNIST *test* images
  (``dinoflow_tools.pool``); its ground truth stays beside it and no stage reads it;
* ``seed``: held-out labelled Fashion-MNIST train images, the curated set retrieval starts from
  (DINOv2's curated seed datasets, Sec. 3);
* ``test``: the 10k Fashion-MNIST test images (decontaminated against and evaluated on).

The report joins the ground truth to what dedup and curate did, per source: kept, removed as a
duplicate, removed as contamination, retrieved; and scores duplicates and contamination.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Fashion-MNIST has 70k images: 10k test (evaluation), 60k train split into seeds and pool.
DEMO_POOL = {
    "size": 60_000,  # pool images in all (base + planted duplicates + planted contamination)
    "seed_size": 10_000,  # labelled seeds, held out of the pool
    "fmnist_fraction": 0.6,  # Fashion-MNIST share of the pool's base images
    "dup_fraction": 0.04,
    "contamination": 500,  # planted copies of test images (exact and 7 transforms)
    "eval_size": 10_000,  # all of Fashion-MNIST test
}


def write_demo_input(store: Any, root_uri: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Generate the demo pool under ``root_uri``; return its counts, URIs and each split's shards."""
    from dinoflow.storage.client import join_uri
    from dinoflow_tools.pool import generate_pool

    kw = {**DEMO_POOL, **overrides}
    size = kw.pop("size")
    info = generate_pool(store, root_uri, size, seed=seed, samples_per_shard=10_000, cache=True, **kw)

    def shards(name: str) -> list[str]:
        return sorted(u for u in store.list(join_uri(root_uri, name)) if u.endswith(".tar"))

    info["splits"] = {"pool": shards("pool"), "seed": shards("seeds"), "test": shards("eval")}
    return info


def _generated_keys(store: Any, info: dict[str, Any], pool_manifest: Any) -> list[str]:
    """The generated pool's keys in the ingested pool's row order: ingest keeps the shards' order (the
    shard list is sorted, members are read in order) and stores the bytes it reads, which the sha256
    of every row confirms."""
    from dinoflow.data.manifest import read_manifest

    written = read_manifest(store, info["pool_manifest_uri"])
    if written.num_rows != pool_manifest.num_rows:
        raise ValueError(
            f"the ingested pool holds {pool_manifest.num_rows} rows, the generated one {written.num_rows}: "
            "ingest quarantined some (see its quarantine.jsonl)"
        )
    if written.column("sha256").to_pylist() != pool_manifest.column("sha256").to_pylist():
        raise ValueError("the ingested pool's rows are not the generated pool's, in order")
    return written.column("key").to_pylist()


def curation_report(store: Any, info: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What dedup and curate did to each source of the pool, against the ground truth.

    ``results``: the run's stage results by task name (``ingest``, ``dedup``, ``curate``)."""
    import io

    import pyarrow.parquet as pq

    from dinoflow.data.manifest import read_manifest
    from dinoflow_tools.pool import read_ground_truth
    from dinoflow_tools.scoring import DUP_RULES, ground_truth_arrays, outcome_arrays, score_arrays

    pool = read_manifest(store, results["ingest"]["manifests"]["pool"])
    keys = pool.column("key").to_pylist()
    # both row-aligned with the ingested pool: the truth by generated key, the outcome by ingested key
    g = ground_truth_arrays(
        read_ground_truth(store, info["ground_truth_uri"]), _generated_keys(store, info, pool)
    )
    kept = read_manifest(store, results["dedup"]["manifest_uri"]).column("key").to_pylist()
    groups = pq.read_table(io.BytesIO(store.get_bytes(results["dedup"]["groups_uri"])))
    o = outcome_arrays(keys, kept, groups)
    scores = score_arrays(
        g["copy_of"], g["transform"], g["contam"], g["source"], o["kept"], o["group"], o["reason"], o["rep"]
    )

    source, reason, contam, planted = g["source"], o["reason"], g["contam"], g["copy_of"] >= 0
    row = {k: i for i, k in enumerate(keys)}
    curated = read_manifest(store, results["curate"]["manifest_uri"]).column("key").to_pylist()
    retrieved = np.zeros(len(keys), bool)
    retrieved[[row[k] for k in curated if k in row]] = True  # seeds kept by curate are not pool rows

    # one row per source; planted copies and contamination get their own rows
    kind = np.where(contam, "planted test copies", np.where(planted, "planted duplicates", source))
    per_source = {}
    for s in sorted(set(kind.tolist()), key=lambda s: (s.startswith("planted"), s)):
        m = kind == s
        per_source[s] = {
            "pool": int(m.sum()),
            "removed_duplicate": int((m & np.isin(reason, DUP_RULES)).sum()),
            "removed_contamination": int((m & (reason == "contamination")).sum()),
            "kept": int((m & o["kept"]).sum()),
            "retrieved": int((m & retrieved).sum()),
        }
    clean_fm = (source == "fashion_mnist") & ~contam & ~planted
    wrongly = [keys[i] for i in np.flatnonzero(clean_fm & (reason == "contamination"))]
    # the rule and the test image of every false contamination removal (groups of older runs lack them)
    listed = {r["key"]: r for r in groups.to_pylist()}
    false = [listed[keys[i]] for i in np.flatnonzero(~contam & (reason == "contamination"))]
    rules = [r.get("contamination_rule", "") or "unrecorded" for r in false]
    return {
        "per_source": per_source,
        "contamination_recall": scores["contamination_recall"],
        "contamination_precision": scores["contamination_precision"],
        "dup_recall": scores["dup_recall"],
        "dup_precision": scores["dup_precision"],
        "clean_fashion_mnist_removed_as_contamination": len(wrongly),
        "clean_fashion_mnist_removed_fraction": round(len(wrongly) / max(1, int(clean_fm.sum())), 5),
        "clean_fashion_mnist_removed_keys": wrongly,
        "false_contamination_per_rule": {r: rules.count(r) for r in sorted(set(rules))},
        "false_contamination_pairs": [
            {
                "key": r["key"],
                "rule": rule,
                "eval_key": r.get("eval_key", ""),
                "touched_by": r.get("touched_by", ""),
            }
            for r, rule in zip(false, rules, strict=True)
        ],
        "retrieved_fashion_mnist_share": round(
            float((source[retrieved] == "fashion_mnist").mean()) if retrieved.any() else 0.0, 4
        ),
        "pool_fashion_mnist_share": round(float((source == "fashion_mnist").mean()), 4),
        "per_transform": scores["per_transform"],
    }


def format_report(rep: dict[str, Any]) -> str:
    """The per-source table and the scores, as the demo prints them."""
    cols = ("pool", "removed_duplicate", "removed_contamination", "kept", "retrieved")
    lines = [
        f"{'source':<22}" + "".join(f"{c.replace('removed_', 'rm ').replace('_', ' '):>16}" for c in cols)
    ]
    for s, v in rep["per_source"].items():
        lines.append(f"{s:<22}" + "".join(f"{v[c]:>16}" for c in cols))
    lines.append(
        f"contamination recall {rep['contamination_recall']:.3f} precision {rep['contamination_precision']:.3f}; "
        f"duplicate recall {rep['dup_recall']:.3f} precision {rep['dup_precision']:.3f}; clean Fashion-MNIST "
        f"removed as contamination {rep['clean_fashion_mnist_removed_as_contamination']} "
        f"({100 * rep['clean_fashion_mnist_removed_fraction']:.2f} %; false removals by rule "
        f"{rep.get('false_contamination_per_rule', {})}); retrieved images that are Fashion-MNIST "
        f"{100 * rep['retrieved_fashion_mnist_share']:.1f} % (pool {100 * rep['pool_fashion_mnist_share']:.1f} %)"
    )
    return "\n".join(lines)
