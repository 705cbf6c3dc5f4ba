"""Pipeline parameter defaults shared by the pipelines (cluster-sized; ``dinoflow demo`` overrides
them with a CPU-sized configuration; a chart install bakes its own bucket, Secret and GPU pool into the
pipelines it uploads, ``dinoflow.kfp.deploy``).

What a person usually changes is a typed parameter (source, backbone, steps, batch size, students,
GPUs per node, nodes); each stage's spec JSON is an optional override on top (``dinoflow schema
<stage>`` prints its fields). URIs that an upstream task provides are filled in at run time.
"""

from __future__ import annotations

import json

import dinoflow.kfp as kfp_defaults


def _j(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


OUTPUT_ROOT = "s3://dinoflow/runs"
DATA_VERSION = "v1"
REGISTRY_URI = "s3://dinoflow/registry"
MODEL_NAME = "dinoflow-fmnist"
# What `dinoflow upload` writes by default: Fashion-MNIST as a dataset folder (train/ and test/ IDX
# pairs, dataset.json with the class names).
SOURCE_URI = f"{kfp_defaults.DATA_PREFIX}/{kfp_defaults.DATASET}"
SOURCE_KIND = "auto"
BACKBONE = "vit_tiny_p4_28"
STUDENTS = "vit_mini_p4_28"  # comma-separated; the first is evaluated and promoted
STEPS = 10000
RETRAIN_STEPS = 2000  # each retrain continues the champion on the grown curated set
BATCH_SIZE = 1024

INGEST = _j({})
EMBED = _j({"batch_size": 256})
DEDUP = _j({"k": 64, "threshold_cos": 0.6, "decontam_threshold_cos": 0.45})  # DINOv2 Sec. 3
CURATE = _j({"strategy": "retrieval", "target_size": 50000})
PRETRAIN = _j({"method": "dinov2", "precision": "bf16"})
DISTILL = _j({"precision": "bf16"})
EVALUATE = _j({"knn_k": [10, 20, 100, 200], "knn_temperature": 0.07})  # DINOv2 k-NN protocol
PROMOTE = _j({"metric": "knn_top1", "margin": 0.0})
# A retrain adds every new image that survives dedup to the curated set (no re-selection).
RETRAIN_CURATE = _j({"strategy": "all", "keep_seeds": True})

GPUS = 1
NODES = 1  # > 1: pretrain/distill run as a Kubeflow TrainJob of NODES x GPUS
TRAINJOB_CONFIG_MAP = kfp_defaults.TRAINJOB_CONFIG_MAP
GPU_NODE_SELECTOR = kfp_defaults.GPU_NODE_SELECTOR
GPU_TOLERATIONS = kfp_defaults.GPU_TOLERATIONS
SECRET = kfp_defaults.S3_SECRET_NAME


def pointers(output_root: str, registry_uri: str, model_name: str) -> dict[str, str]:
    """Where a full run publishes what a retrain starts from (read when a task runs): the champion
    (the registry's pointer), the curated set and the evaluation set; and the ingest ledger."""
    return {
        "champion": f"{registry_uri}/{model_name}/champion.json",
        "curated": f"{output_root}/curated.json",
        "eval_set": f"{output_root}/eval-set.json",
        "seen": f"{output_root}/ingested",
    }
