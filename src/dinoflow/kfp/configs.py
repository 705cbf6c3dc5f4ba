"""Arguments of the full pipeline for local runs: ``tiny`` (the end-to-end test, seconds per stage)
and ``demo`` (``dinoflow demo``: CPU-sized, minutes). Cluster defaults live in ``pipelines/params.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dinoflow.data.idx import FASHION_MNIST_CLASSES

_J = json.dumps


def _ingest(
    paths: dict[str, tuple[Path, Path]],
    limits: int | None,
    extra: dict[str, list[str]] | None = None,
    source: str = "fashion-mnist",
) -> str:
    """Fashion-MNIST's IDX pairs by split, plus ``extra`` splits of other inputs (the demo's generated
    pool, seed and test shards), in one ingest; with ``extra`` each input's kind goes by its name."""
    splits = {split: [str(p[0]), str(p[1])] for split, p in paths.items()}
    spec: dict[str, Any] = {
        "kind": "auto" if extra else "idx",
        "source": source,
        "splits": {**splits, **(extra or {})},
        "samples_per_shard": 5000,
        "label_names": FASHION_MNIST_CLASSES,
    }
    if limits:
        spec["limit_per_split"] = limits
    return _J(spec, sort_keys=True)


def _demo_preset() -> dict[str, Any]:
    """The DEMO training preset (~8 min of CPU training on 2 cores), as pretrain spec fields."""
    from dinoflow.stages import get_stage
    from dinoflow.train.presets import DEMO

    fields = set(get_stage("pretrain").spec_cls.model_fields)
    return {k: v for k, v in DEMO.items() if k in fields}


# 28 px images, patch 4: 2 global crops at 28 px and 2 local crops at 12 px
_TINY_CROPS = {"global_crop_px": 28, "local_crop_px": 12, "local_crops_number": 2}


def tiny_arguments(
    paths: dict[str, tuple[Path, Path]], output_root: str, data_version: str = "v1"
) -> dict[str, Any]:
    """The smallest full run that still exercises every stage: 256 images per split, 2-layer ViTs."""
    student = "vit_test_p4_28"
    return {
        "output_root": output_root,
        "data_version": data_version,
        "ingest_spec": _ingest(paths, 256),
        "embed_spec": _J(
            {
                "batch_size": 128,
                "num_workers": 0,
                "device": "cpu",
                "bootstrap_backbone": "vit_test_p4_28",
                "bootstrap_sample": 128,
                "bootstrap_steps": 2,
            }
        ),
        # the 2-step bootstrap embedder maps every image to ~one point (LayerScale 1e-5 leaves its
        # CLS token image-blind), so this wiring test disables the cosine rules; hash rules still run
        "dedup_spec": _J({"k": 8, "threshold_cos": 1.0, "decontam_threshold_cos": 1.0}),
        "curate_spec": _J({"strategy": "retrieval", "target_size": 64}),
        "pretrain_spec": _J(
            {
                "method": "dinov2",
                "backbone": "vit_test_p4_28",
                "steps": 2,
                "batch_size": 16,
                "checkpoint_every_steps": 2,
                "crops": _TINY_CROPS,
            }
        ),
        "distill_spec": _J({"students": [student], "steps": 2, "batch_size": 16, "crops": _TINY_CROPS}),
        "evaluate_spec": _J(
            {
                "knn_k": [10, 20],
                "linear_epochs": 2,
                "linear_lrs": [0.01],
                "logreg_cs": [1.0],
                "baseline": False,
                "report_examples": 2,
            }
        ),
        "promote_spec": _J({"metric": "knn_top1"}),
        "model_name": "tiny",
        "registry_uri": f"{output_root}/registry",
    }


# The demo's splits: the generated pool, the labelled seeds, the test set, Fashion-MNIST train (probes).
DEMO_SPLITS = {"pool_split": "pool", "seed_split": "seed", "eval_split": "test", "probe_split": "train"}


# The demo's embed stage: the training-free pixel embedder on the CPU.
DEMO_EMBED = {"embedder": "pixels", "batch_size": 1024, "num_workers": 1, "device": "cpu"}

# the demo's dedup (also what `dinoflow bench dedup --demo-pool-seed` measures); see demo_arguments
DEMO_DEDUP = {
    "k": 16,
    "threshold_cos": 0.98,
    "decontam_threshold_cos": 1.0,  # off: cosine can never exceed 1
    "phash_decontaminates": False,
    "contamination_spread": "self",
}


def demo_arguments(
    paths: dict[str, tuple[Path, Path]],
    output_root: str,
    data_version: str = "demo",
    *,
    shards: dict[str, list[str]],
    pretrain_steps: int | None = None,
) -> dict[str, Any]:
    """``dinoflow demo``: the DINOv2 story on 2 CPU cores, on the mixed pool of
    ``dinoflow_tools.demo_input`` (``shards``: its pool, seed and test splits).
    ``pretrain_steps`` replaces the DEMO preset's 1,800 steps (the README's frontier of k-NN
    against demo minutes).

    The first generation's embedder is the training-free pixel one (a pool no model has seen);
    dedup removes planted copies and decontaminates against the test images with its thresholds
    for pixel correlation; retrieval curates from the pool around the labelled seeds and keeps them;
    pretraining gets most of the time; the teacher and the distilled student are both evaluated."""
    return {
        "output_root": output_root,
        "data_version": data_version,
        "ingest_spec": _ingest({"train": paths["train"]}, None, extra=shards, source="demo"),
        "embed_spec": _J(DEMO_EMBED),
        # the pixel descriptor's dedup threshold measured on the 100k benchmark pool (README, `dinoflow
        # bench dedup`): Fashion-MNIST neighbours correlate > 0.9. Decontamination chosen on a seed-1
        # validation pool (`dinoflow bench dedup --demo-pool-seed 1`) and Fashion-MNIST train vs test
        # (`--fashion-mnist-train`): only exact and verified pixel copies (copy detection's geometric
        # and global-edit checks), each dropped alone; no pixel-cosine or pHash rule (distinct 28 px
        # products exceed any usable 14 px correlation, and their 64-bit pHashes collide)
        "dedup_spec": _J(DEMO_DEDUP),
        "curate_spec": _J({"strategy": "retrieval", "target_size": 40000, "keep_seeds": True}),
        "pretrain_spec": _J(
            {
                **_demo_preset(),
                "checkpoint_every_steps": 500,
                **({"steps": pretrain_steps} if pretrain_steps else {}),
            }
        ),
        "distill_spec": _J({"students": ["vit_micro_p7_28"], "steps": 300, "batch_size": 128}),
        # one feature cache for the teacher's and the student's evaluations: the raw-pixel baseline
        # (every protocol on 60k x 784 pixels) is computed by the first and read by the second
        "evaluate_spec": _J(
            {
                "knn_k": [20],
                "linear_lrs": [0.03, 0.1],
                "linear_epochs": 5,
                "logreg_cs": [1.0],
                "feature_cache_uri": f"{output_root}/eval-cache",
            }
        ),
        "promote_spec": _J({"metric": "knn_top1"}),
        "model_name": "fmnist-demo",
        "registry_uri": f"{output_root}/registry",
        **DEMO_SPLITS,
    }
