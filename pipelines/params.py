"""Pipeline parameter defaults shared by the pipelines (cluster-sized; ``dinoflow demo`` overrides
them with a CPU-sized configuration).

Each stage spec is one JSON string parameter; ``dinoflow schema <stage>`` prints its fields. URIs
that an upstream task provides are filled in at run time and may be left out here.
"""

from __future__ import annotations

import json

import dinoflow.kfp as kfp_defaults


def _j(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


OUTPUT_ROOT = "s3://dinoflow/runs"
DATA_VERSION = "v1"
REGISTRY_URI = "s3://dinoflow/registry"

# Fashion-MNIST as uploaded by `make data` to the raw bucket; any IngestSpec works here.
INGEST = _j(
    {
        "kind": "idx",
        "source": "fashion-mnist",
        "splits": {
            "train": [
                "s3://dinoflow-raw/fashion-mnist/train-images-idx3-ubyte.gz",
                "s3://dinoflow-raw/fashion-mnist/train-labels-idx1-ubyte.gz",
            ],
            "test": [
                "s3://dinoflow-raw/fashion-mnist/t10k-images-idx3-ubyte.gz",
                "s3://dinoflow-raw/fashion-mnist/t10k-labels-idx1-ubyte.gz",
            ],
        },
    }
)
EMBED = _j({"batch_size": 256})
DEDUP = _j({"k": 64, "threshold_cos": 0.6, "decontam_threshold_cos": 0.45})  # DINOv2 Sec. 3
CURATE = _j({"strategy": "retrieval", "target_size": 50000})
PRETRAIN = _j({"method": "dinov2", "steps": 10000, "batch_size": 1024, "precision": "bf16"})
DISTILL = _j({"students": ["vit_tiny_p4_28"], "steps": 5000, "batch_size": 1024})
EVALUATE = _j({"knn_k": [10, 20, 100, 200], "knn_temperature": 0.07})  # DINOv2 k-NN protocol
PROMOTE = _j(
    {"model_name": "dinoflow-fmnist", "registry_uri": REGISTRY_URI, "metric": "knn_top1", "margin": 0.0}
)

GPUS = 1
NODES = 1  # > 1: pretrain/distill run as a Kubeflow TrainJob of NODES x GPUS
TRAINJOB_CONFIG_MAP = kfp_defaults.TRAINJOB_CONFIG_MAP
GPU_NODE_SELECTOR = kfp_defaults.GPU_NODE_SELECTOR
GPU_TOLERATIONS = kfp_defaults.GPU_TOLERATIONS
SECRET = kfp_defaults.S3_SECRET_NAME
