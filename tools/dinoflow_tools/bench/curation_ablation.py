"""``dinoflow bench curation-ablation``: does curated data beat uncurated data at the same budget?

DINOv2 (Sec. 3, Table 2 of its ablations: LVD-142M vs uncurated data of the same size) trains on a
curated set retrieved around curated seed datasets from an uncurated pool, deduplicated and
decontaminated. Here, on the demo's mixed pool (``dinoflow_tools.demo_input``: Fashion-MNIST train
mixed with glyphs, photo crops, digits, icons, planted duplicates and planted copies of test images):

1. curation exactly as ``make demo`` runs it (ingest -> pixel embedder -> dedup + decontamination ->
   retrieval around the labelled seeds, seeds kept), through the stages on the real store;
2. the same pretraining (the demo's recipe, same steps and batch: the same compute) on
   (a) the curated set, (b) a random sample of the same size from the uncurated pool (pool + seeds),
   (c) the whole uncurated pool;
3. each teacher scored by the evaluate stage: weighted k-NN (k = 20) and the linear probe on the 10k
   Fashion-MNIST test images, probes trained on the 60k train images.

Two seeds each (``--seeds``); the claim holds when curated beats both by more than the seed spread.
Last output line: JSON with ``curated_knn_top1``, ``random_knn_top1``, ``pool_knn_top1`` (seed means),
the linear figures, per-seed values, spreads and margins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

ARMS = ("curated", "random", "pool")


def _curate(store: Any, root: str, pool: dict[str, Any]) -> dict[str, str]:
    """The demo's curation on the generated pool; returns manifest URIs by role."""
    from dinoflow.data.idx import fashion_mnist_paths
    from dinoflow.kfp.configs import demo_arguments
    from dinoflow.stages import get_stage

    args = demo_arguments(fashion_mnist_paths(), root, shards=pool["splits"])

    def run(stage: str, spec: dict[str, Any]) -> Any:
        s = get_stage(stage)
        return s.run(s.parse_spec(spec), store)

    ing = run("ingest", {**json.loads(args["ingest_spec"]), "output_uri": f"{root}/ingest"})
    embed = json.loads(args["embed_spec"])
    emb = {
        split: run(
            "embed", {**embed, "output_uri": f"{root}/embed-{split}", "manifest_uri": ing.manifests[split]}
        )
        for split in ("pool", "seed", "test")
    }
    dd = run(
        "dedup",
        {
            **json.loads(args["dedup_spec"]),
            "output_uri": f"{root}/dedup",
            "manifest_uri": ing.manifests["pool"],
            "embeddings_uri": emb["pool"].embeddings_uri,
            "eval_manifest_uris": [ing.manifests["test"]],
            "eval_embeddings_uris": [emb["test"].embeddings_uri],
        },
    )
    cu = run(
        "curate",
        {
            **json.loads(args["curate_spec"]),
            "output_uri": f"{root}/curate",
            "manifest_uri": dd.manifest_uri,
            "embeddings_uri": dd.embeddings_uri,
            "seed_manifest_uris": [ing.manifests["seed"]],
            "seed_embeddings_uris": [emb["seed"].embeddings_uri],
        },
    )
    return {
        "curated": cu.manifest_uri,
        "pool": ing.manifests["pool"],
        "seed": ing.manifests["seed"],
        "train": ing.manifests["train"],
        "test": ing.manifests["test"],
        "pretrain_spec": args["pretrain_spec"],
        "evaluate_spec": args["evaluate_spec"],
    }


def _arms(store: Any, root: str, m: dict[str, str], seed: int) -> dict[str, str]:
    """Manifests of the three arms: curated; a random sample of its size from pool + seeds; all of it."""
    import numpy as np
    import pyarrow as pa

    from dinoflow.data.manifest import read_manifest, write_manifest

    curated = read_manifest(store, m["curated"])
    uncurated = pa.concat_tables([read_manifest(store, m["pool"]), read_manifest(store, m["seed"])])
    rows = np.sort(np.random.default_rng(seed).choice(uncurated.num_rows, curated.num_rows, replace=False))
    out = {"curated": m["curated"]}
    for name, table in (("random", uncurated.take(rows)), ("pool", uncurated)):
        out[name] = f"{root}/arms/{name}-{seed}/manifest.parquet"
        write_manifest(store, out[name], table)
    return out


def _same_warmups(spec: dict[str, Any], n_images: int) -> None:
    """Give every arm the same warm-ups in steps: the preset counts the teacher-temperature warm-up
    and the frozen prototypes in epochs, so the whole pool (more images) would warm up for more of
    the same number of steps than the curated set. Both become the share of the run they are in the
    demo (teacher temperature ~30 %, as DINOv2's 30 of 100 epochs; prototypes frozen ~3 %)."""
    steps_per_epoch = max(1, n_images // spec["batch_size"])
    spec["dinov2"] = {
        **spec["dinov2"],
        "teacher_temp_warmup_epochs": 0.3 * spec["steps"] / steps_per_epoch,
        "freeze_prototypes_epochs": 0.03 * spec["steps"] / steps_per_epoch,
    }


def main(argv: list[str]) -> None:
    import torch

    from dinoflow.data.manifest import read_manifest
    from dinoflow.stages import get_stage
    from dinoflow_tools.bench._store import bench_store
    from dinoflow_tools.demo_input import write_demo_input

    p = argparse.ArgumentParser(prog="dinoflow bench curation-ablation", description=__doc__)
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per arm (default: the demo's)")
    p.add_argument("--pool-size", type=int, default=None, help="pool images (default: the demo's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    with bench_store() as store:
        root = f"s3://bench-{uuid.uuid4().hex[:10]}/curation-ablation"
        pool = write_demo_input(store, f"{root}/input", **({"size": a.pool_size} if a.pool_size else {}))
        m = _curate(store, root, pool)
        pretrain, evaluate = get_stage("pretrain"), get_stage("evaluate")
        figures: dict[str, dict[str, list[float]]] = {arm: {"knn": [], "linear": []} for arm in ARMS}
        for seed in seeds:
            arms = _arms(store, root, m, seed)
            for arm in ARMS:
                spec = json.loads(m["pretrain_spec"])
                spec.update(output_uri=f"{root}/pretrain/{arm}-{seed}", manifest_uri=arms[arm], seed=seed)
                if a.steps:
                    spec.update(steps=a.steps, epochs=None)
                _same_warmups(spec, read_manifest(store, arms[arm]).num_rows)
                pt = pretrain.run(pretrain.parse_spec(spec), store)
                ev = evaluate.run(
                    evaluate.parse_spec(
                        {
                            **json.loads(m["evaluate_spec"]),
                            "output_uri": f"{root}/evaluate/{arm}-{seed}",
                            "backbone_uri": pt.backbone_uri,
                            "train_manifest_uri": m["train"],
                            "test_manifest_uri": m["test"],
                            "baseline": False,
                        }
                    ),
                    store,
                )
                figures[arm]["knn"].append(ev.metrics["knn_top1"])
                figures[arm]["linear"].append(ev.metrics["linear_top1"])
                print(
                    f"seed {seed} {arm:<8} steps {pt.steps}  k-NN {ev.metrics['knn_top1']:.4f}  "
                    f"linear {ev.metrics['linear_top1']:.4f}",
                    flush=True,
                )
    mean = {arm: {k: statistics.mean(v) for k, v in f.items()} for arm, f in figures.items()}
    spread = {arm: {k: max(v) - min(v) for k, v in f.items()} for arm, f in figures.items()}
    result: dict[str, Any] = {}
    for arm in ARMS:
        result[f"{arm}_knn_top1"] = round(mean[arm]["knn"], 4)
        result[f"{arm}_linear_top1"] = round(mean[arm]["linear"], 4)
        result[f"{arm}_knn_per_seed"] = figures[arm]["knn"]
        result[f"{arm}_linear_per_seed"] = figures[arm]["linear"]
    for metric in ("knn", "linear"):
        worst_spread = max(spread[arm][metric] for arm in ARMS)
        margin = mean["curated"][metric] - max(mean["random"][metric], mean["pool"][metric])
        result[f"curated_{metric}_margin"] = round(margin, 4)
        result[f"max_seed_spread_{metric}"] = round(worst_spread, 4)
        result[f"claim_holds_{metric}"] = bool(margin > worst_spread)
    result.update(seeds=seeds, wall_seconds=round(time.perf_counter() - t0, 1), threads=a.threads)
    print(f"{'arm':<10}{'k-NN top-1':>12}{'linear top-1':>14}")
    for arm in ARMS:
        print(f"{arm:<10}{mean[arm]['knn']:>12.4f}{mean[arm]['linear']:>14.4f}")
    print(json.dumps(result))
