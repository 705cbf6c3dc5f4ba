"""The Kubeflow layer's shared pieces: images, secrets, component runtime, GPU settings, compile,
local runs, cluster submission and multi-node TrainJobs.

Only ``runtime`` is imported inside running components; nothing here is imported by a stage.
"""

from __future__ import annotations

from dinoflow import __version__

# The images the deployment issue builds: the same ``pip install .`` as the venv, kfp included.
IMAGE = f"ghcr.io/dinoflow/dinoflow:{__version__}"
GPU_IMAGE = f"ghcr.io/dinoflow/dinoflow:{__version__}-cuda"

# Object-store credentials reach pods only through this Secret (keys -> env vars), never as values.
S3_SECRET_NAME = "dinoflow-s3"
S3_SECRET_KEYS = {
    "endpoint": "DINOFLOW_S3_ENDPOINT",
    "access_key": "DINOFLOW_S3_ACCESS_KEY",
    "secret_key": "DINOFLOW_S3_SECRET_KEY",
}

GPU_STAGES = ("embed", "pretrain", "distill", "evaluate")

# Where `dinoflow upload` puts datasets (one folder each) and the one the pipelines ingest by default;
# a chart install bakes its own bucket into the uploaded pipelines' defaults (dinoflow.kfp.deploy).
DATA_PREFIX = "s3://dinoflow/raw"
DATASET = "fashion-mnist"

# The GPU pool, by the NVIDIA GPU operator's node label and the usual taint (GKE/EKS device-plugin
# conventions): the default of the pipelines' parameters, the TrainJob's pods and the chart overlays.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]

# What the chart's ``<release>-trainjob`` ConfigMap holds (dinoflow.kfp.trainjob.job_from_env reads
# them); the compiled pipelines load these keys as env of the multi-node launcher, optionally.
TRAINJOB_ENV_KEYS = (
    "DINOFLOW_TRAINJOB_KIND",
    "DINOFLOW_TRAINJOB_RUNTIME_KIND",
    "DINOFLOW_TRAINJOB_RUNTIME",
    "DINOFLOW_TRAINJOB_IMAGE",
    "DINOFLOW_TRAINJOB_IMAGE_PULL_SECRETS",
    "DINOFLOW_S3_SECRET",
    "DINOFLOW_TRAINJOB_SERVICE_ACCOUNT",
    "DINOFLOW_TRAINJOB_QUEUE",
    "DINOFLOW_TRAINJOB_PRIORITY_CLASS",
    "DINOFLOW_TRAINJOB_NODE_SELECTOR",
    "DINOFLOW_TRAINJOB_TOLERATIONS",
    "DINOFLOW_TRAINJOB_TIMEOUT_SECONDS",
)
TRAINJOB_CONFIG_MAP = "dinoflow-trainjob"  # the chart's name for release "dinoflow"; a pipeline parameter

__all__ = [
    "DATASET",
    "DATA_PREFIX",
    "GPU_IMAGE",
    "GPU_NODE_SELECTOR",
    "GPU_STAGES",
    "GPU_TOLERATIONS",
    "IMAGE",
    "S3_SECRET_KEYS",
    "S3_SECRET_NAME",
    "TRAINJOB_CONFIG_MAP",
    "TRAINJOB_ENV_KEYS",
]
