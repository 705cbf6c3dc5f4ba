"""Pod settings for pipeline tasks: GPUs, node pools, ``/dev/shm``, requests, retries, credentials.

Applied at pipeline-definition time with kfp-kubernetes. ``kfp.local`` only warns about them, so
the same pipeline runs locally and on a cluster. Credentials always come from a Kubernetes Secret
(``use_secret_as_env``); no value of them is ever written into a compiled YAML.
"""

from __future__ import annotations

from typing import Any

from kfp import dsl, kubernetes

from dinoflow.kfp import S3_SECRET_KEYS, TRAINJOB_ENV_KEYS

GPU_CPU_REQUEST = "8"
GPU_MEMORY_REQUEST = "48G"
CPU_CPU_REQUEST = "2"
CPU_MEMORY_REQUEST = "8G"
SHM_SIZE = "16Gi"  # PyTorch DataLoader workers pass batches through shared memory
LAUNCHER_CPU_REQUEST = "250m"  # a multi-node launcher only submits a TrainJob and polls it
LAUNCHER_MEMORY_REQUEST = "1G"
RETRIES = 2  # GPU nodes get preempted/evicted; a retry resumes from the newest checkpoint
RETRY_BACKOFF = "60s"
RETRY_BACKOFF_FACTOR = 2.0
RETRY_BACKOFF_MAX = "900s"


def with_credentials(task: Any, secret_name: Any) -> Any:
    """Object-store endpoint and keys as env vars from the Secret ``secret_name`` (a parameter). The
    keys are optional: with workload identity (IRSA) the Secret holds the endpoint only and the store
    client asks the pod's identity for credentials (``dinoflow.storage.client.workload_identity``)."""
    return kubernetes.use_secret_as_env(
        task, secret_name=secret_name, secret_key_to_env=dict(S3_SECRET_KEYS), optional=True
    )


def _retries(task: Any) -> Any:
    return task.set_retry(
        num_retries=RETRIES,
        backoff_duration=RETRY_BACKOFF,
        backoff_factor=RETRY_BACKOFF_FACTOR,
        backoff_max_duration=RETRY_BACKOFF_MAX,
    )


def cpu_task(task: Any, secret_name: Any, display_name: str | None = None) -> Any:
    """A CPU stage: requests, credentials, caching on (keyed on the task's data_version input)."""
    task.set_cpu_request(CPU_CPU_REQUEST).set_memory_request(CPU_MEMORY_REQUEST)
    task.set_caching_options(enable_caching=True)
    if display_name:
        task.set_display_name(display_name)
    return with_credentials(task, secret_name)


def gpu_task(
    task: Any,
    secret_name: Any,
    gpus: Any,
    node_selector: Any,
    tolerations: Any,
    display_name: str | None = None,
) -> Any:
    """A GPU stage: ``nvidia.com/gpu`` x ``gpus``, pinned to the GPU pool, memory-backed /dev/shm,
    requests, retries with exponential backoff, credentials from the Secret."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_request(GPU_CPU_REQUEST).set_memory_request(GPU_MEMORY_REQUEST)
    task.set_caching_options(enable_caching=True)
    if display_name:
        task.set_display_name(display_name)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    _retries(task)
    return with_credentials(task, secret_name)


def launcher_task(
    task: Any, secret_name: Any, trainjob_config_map: Any, display_name: str | None = None
) -> Any:
    """The launcher of a multi-node job: a small CPU pod (no GPU) that submits the TrainJob/PyTorchJob
    and waits on it. It gets the job's settings from the chart's ConfigMap (optional: without it the
    code's defaults apply), its own pod name and uid for the job's ownerReference, and retries (a
    retry adopts the job its first try created)."""
    task.set_cpu_request(LAUNCHER_CPU_REQUEST).set_memory_request(LAUNCHER_MEMORY_REQUEST)
    task.set_caching_options(enable_caching=True)
    if display_name:
        task.set_display_name(display_name)
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=trainjob_config_map,
        config_map_key_to_env={k: k for k in TRAINJOB_ENV_KEYS},
        optional=True,
    )
    kubernetes.use_field_path_as_env(task, "DINOFLOW_POD_NAME", "metadata.name")
    kubernetes.use_field_path_as_env(task, "DINOFLOW_POD_UID", "metadata.uid")
    kubernetes.use_field_path_as_env(task, "DINOFLOW_NAMESPACE", "metadata.namespace")
    _retries(task)
    return with_credentials(task, secret_name)


def training_task(
    component: Any,
    args: dict[str, Any],
    secret_name: Any,
    gpu: dict[str, Any],
    nodes: Any,
    trainjob_config_map: Any,
    name: str,
) -> Any:
    """A pretrain/distill step that holds GPUs only where it trains.

    KFP fixes a task's resources when the pipeline is defined, so the choice is made on the ``nodes``
    pipeline parameter: ``nodes > 1`` runs a CPU launcher (:func:`launcher_task`) that submits an
    ``nodes`` x ``gpus`` TrainJob; otherwise a GPU task trains in its own pod. Returns the ``result``
    artifact of whichever branch ran (``dsl.OneOf``), for downstream tasks."""
    gpus = gpu["gpus"]
    with dsl.If(nodes > 1, name=f"{name}-multi-node"):
        multi = launcher_task(
            component(**args, gpus=gpus, nnodes=nodes, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
            secret_name,
            trainjob_config_map,
            display_name=f"{name} (launcher)",
        )
    with dsl.Else(name=f"{name}-one-node"):
        one = gpu_task(component(**args, gpus=gpus, nnodes=1), secret_name, display_name=name, **gpu)
    return dsl.OneOf(multi.outputs["result"], one.outputs["result"])
