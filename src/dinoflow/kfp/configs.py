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
    paths: dict[str, tuple[Path, Path]], limits: int | None, extra: dict[str, list[str]] | None = None
) -> str:
    splits = {split: [str(p[0]), str(p[1])] for split, p in paths.items()}
    spec: dict[str, Any] = {
        "kind": "idx",
        "source": "fashion-mnist",
        "splits": splits,
        "samples_per_shard": 5000,
        "label_names": FASHION_MNIST_CLASSES,
    }
    if limits:
        spec["limit_per_split"] = limits
    return _J(spec, sort_keys=True)


def _demo_preset() -> dict[str, Any]:
    """The DEMO training preset (~5 min of CPU training), as pretrain spec fields."""
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


def demo_arguments(
    paths: dict[str, tuple[Path, Path]], output_root: str, data_version: str = "demo"
) -> dict[str, Any]:
    """``dinoflow demo``: all of Fashion-MNIST through every stage on 2 CPU cores.

    Patch-7 ViTs (4x4 tokens at 28 px) keep each stage to minutes; the pretrain stage uses the DEMO
    preset. The dedup thresholds suit our short-trained embedder, not DINOv2's copy-detection one
    (whose 0.6 / 0.45 would put most same-class Fashion-MNIST images in one group)."""
    # half a pass over the 30k curated images (~1 min); 2.5 passes (~4 min) gave no better k-NN
    # (66.4 % vs 66.9 %): the short CPU recipe plateaus early
    pretrain = {**_demo_preset(), "epochs": 0.5, "checkpoint_every_steps": 100}
    return {
        "output_root": output_root,
        "data_version": data_version,
        "ingest_spec": _ingest(paths, None),
        "embed_spec": _J(
            {
                "batch_size": 512,
                "num_workers": 1,
                "device": "cpu",
                "bootstrap_backbone": "vit_mini_p7_28",
                "bootstrap_sample": 10000,
                "bootstrap_steps": 80,
            }
        ),
        "dedup_spec": _J({"k": 16, "threshold_cos": 0.97, "decontam_threshold_cos": 0.97}),
        "curate_spec": _J({"strategy": "retrieval", "target_size": 30000}),
        "pretrain_spec": _J(pretrain),
        "distill_spec": _J({"students": ["vit_micro_p7_28"], "steps": 60, "batch_size": 128}),
        "evaluate_spec": _J(
            {"knn_k": [10, 20], "linear_lrs": [0.01, 0.1], "linear_epochs": 5, "logreg_cs": [0.1, 1.0]}
        ),
        "promote_spec": _J({"metric": "knn_top1"}),
        "model_name": "fmnist-demo",
        "registry_uri": f"{output_root}/registry",
    }
