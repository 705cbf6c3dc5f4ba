"""Stage-only pipelines: each stage alone, fed by the URIs of earlier outputs in its spec JSON.

KFP has no per-task re-run; re-running one stage from the UI means running its stage-only pipeline
with the spec of that stage (``dinoflow schema <stage>``: the upstream URIs are ordinary fields, e.g.
``manifest_uri`` from an ingest result). With caching on and the same data_version, nothing else runs.
"""

from dinoflow.components.curate import curate
from dinoflow.components.dedup import dedup
from dinoflow.components.distill import distill
from dinoflow.components.embed import embed
from dinoflow.components.evaluate import evaluate
from dinoflow.components.ingest import ingest
from dinoflow.components.pretrain import pretrain
from dinoflow.components.promote import promote
from dinoflow.pipelines import params as P
from kfp import dsl

from dinoflow.kfp.gpu import cpu_task, gpu_task


@dsl.pipeline(name="dinoflow-stage-ingest", description="Run the ingest stage alone.")
def ingest_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
):
    """Run the ingest stage alone.

    Args:
        spec_json: the ingest spec as JSON, upstream URIs included (`dinoflow schema ingest`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/ingest/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    cpu_task(
        ingest(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
    )


@dsl.pipeline(name="dinoflow-stage-embed", description="Run the embed stage alone.")
def embed_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
    gpus: int = P.GPUS,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
):
    """Run the embed stage alone.

    Args:
        spec_json: the embed spec as JSON, upstream URIs included (`dinoflow schema embed`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/embed/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
        gpus: GPUs for this task.
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
    """
    gpu_task(
        embed(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
        gpus,
        gpu_node_selector,
        gpu_tolerations,
    )


@dsl.pipeline(name="dinoflow-stage-dedup", description="Run the dedup stage alone.")
def dedup_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
):
    """Run the dedup stage alone.

    Args:
        spec_json: the dedup spec as JSON, upstream URIs included (`dinoflow schema dedup`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/dedup/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    cpu_task(
        dedup(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
    )


@dsl.pipeline(name="dinoflow-stage-curate", description="Run the curate stage alone.")
def curate_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
):
    """Run the curate stage alone.

    Args:
        spec_json: the curate spec as JSON, upstream URIs included (`dinoflow schema curate`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/curate/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    cpu_task(
        curate(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
    )


@dsl.pipeline(name="dinoflow-stage-pretrain", description="Run the pretrain stage alone.")
def pretrain_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
    gpus: int = P.GPUS,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
):
    """Run the pretrain stage alone.

    Args:
        spec_json: the pretrain spec as JSON, upstream URIs included (`dinoflow schema pretrain`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/pretrain/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
        gpus: GPUs for this task.
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
    """
    gpu_task(
        pretrain(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
        gpus,
        gpu_node_selector,
        gpu_tolerations,
    )


@dsl.pipeline(name="dinoflow-stage-distill", description="Run the distill stage alone.")
def distill_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
    gpus: int = P.GPUS,
    gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default)
    gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
):
    """Run the distill stage alone.

    Args:
        spec_json: the distill spec as JSON, upstream URIs included (`dinoflow schema distill`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/distill/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
        gpus: GPUs for this task.
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
    """
    gpu_task(
        distill(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
        gpus,
        gpu_node_selector,
        gpu_tolerations,
    )


@dsl.pipeline(name="dinoflow-stage-evaluate", description="Run the evaluate stage alone.")
def evaluate_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
):
    """Run the evaluate stage alone.

    Args:
        spec_json: the evaluate spec as JSON, upstream URIs included (`dinoflow schema evaluate`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/evaluate/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    cpu_task(
        evaluate(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
    )


@dsl.pipeline(name="dinoflow-stage-promote", description="Run the promote stage alone.")
def promote_only(
    spec_json: str,
    output_root: str = P.OUTPUT_ROOT,
    data_version: str = P.DATA_VERSION,
    overrides_json: str = "{}",
    s3_secret_name: str = P.SECRET,
):
    """Run the promote stage alone.

    Args:
        spec_json: the promote spec as JSON, upstream URIs included (`dinoflow schema promote`).
        output_root: s3:// prefix; output goes to {output_root}/{data_version}/promote/{spec hash}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
    """
    cpu_task(
        promote(
            spec_json=spec_json,
            output_root=output_root,
            data_version=data_version,
            overrides_json=overrides_json,
        ),
        s3_secret_name,
    )


PIPELINES = {
    s: globals()[f"{s}_only"]
    for s in ("ingest", "embed", "dedup", "curate", "pretrain", "distill", "evaluate", "promote")
}
