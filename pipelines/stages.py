"""Stage-only pipelines: each stage alone, fed by the URIs of earlier outputs in its spec JSON.

KFP has no per-task re-run; re-running one stage from the UI means running its stage-only pipeline
with the spec of that stage (``dinoflow schema <stage>``: the upstream URIs are ordinary fields, e.g.
``manifest_uri`` from an ingest result). With caching on and the same data_version, nothing else runs.

The pipelines are built from the one list of stages (``dinoflow.stages.STAGES``); a GPU stage
(``dinoflow.kfp.GPU_STAGES``) also takes the GPU count and the GPU pool's node selector and
tolerations.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from dinoflow.components import get_component
from dinoflow.kfp import GPU_STAGES
from dinoflow.kfp.gpu import cpu_task, gpu_task, training_task
from dinoflow.pipelines import params as P
from dinoflow.stages import STAGES, TRAINING_STAGES

_DOC = """Run the {stage} stage alone.

    Args:
        spec_json: the {stage} spec as JSON, upstream URIs included (`dinoflow schema {stage}`).
        output_root: s3:// prefix; output goes to {{output_root}}/{{data_version}}/{stage}/{{spec hash}}.
        data_version: the cache key of the inputs; bump it when they change.
        overrides_json: JSON object of spec fields layered over spec_json (e.g. a manifest_uri).
        s3_secret_name: Kubernetes Secret with keys endpoint, access_key, secret_key.
"""
_GPU_DOC = """        gpus: GPUs for this task.
        gpu_node_selector: node labels of the GPU pool.
        gpu_tolerations: tolerations for the GPU pool's taints.
"""

_TRAIN_DOC = """        nodes: nodes; > 1 runs the stage as a Kubeflow TrainJob (nodes x gpus) from a CPU launcher.
        trainjob_config_map: ConfigMap with the TrainJob settings (the chart's <release>-trainjob; optional).
"""


def _spec_args(params: dict[str, Any]) -> dict[str, Any]:
    """The component inputs every stage-only pipeline passes through unchanged."""
    return {k: params[k] for k in ("spec_json", "output_root", "data_version", "overrides_json")}


def stage_only(stage: str) -> Callable[..., Any]:
    """The pipeline that runs ``stage`` alone (named ``dinoflow-stage-<stage>``)."""
    component = get_component(stage)

    def cpu_stage(
        spec_json: str,
        output_root: str = P.OUTPUT_ROOT,
        data_version: str = P.DATA_VERSION,
        overrides_json: str = "{}",
        s3_secret_name: str = P.SECRET,
    ):
        cpu_task(component(**_spec_args(locals())), s3_secret_name)

    def gpu_stage(
        spec_json: str,
        output_root: str = P.OUTPUT_ROOT,
        data_version: str = P.DATA_VERSION,
        overrides_json: str = "{}",
        s3_secret_name: str = P.SECRET,
        gpus: int = P.GPUS,
        gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default, never mutated)
        gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    ):
        gpu_task(component(**_spec_args(locals())), s3_secret_name, gpus, gpu_node_selector, gpu_tolerations)

    def training_stage(
        spec_json: str,
        output_root: str = P.OUTPUT_ROOT,
        data_version: str = P.DATA_VERSION,
        overrides_json: str = "{}",
        s3_secret_name: str = P.SECRET,
        gpus: int = P.GPUS,
        nodes: int = P.NODES,
        trainjob_config_map: str = P.TRAINJOB_CONFIG_MAP,
        gpu_node_selector: dict = P.GPU_NODE_SELECTOR,  # noqa: B006 (a KFP default, never mutated)
        gpu_tolerations: list = P.GPU_TOLERATIONS,  # noqa: B006
    ):
        gpu = {"gpus": gpus, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
        training_task(
            component, _spec_args(locals()), s3_secret_name, gpu, nodes, trainjob_config_map, name=stage
        )

    gpu = stage in GPU_STAGES
    training = stage in TRAINING_STAGES
    fn = training_stage if training else gpu_stage if gpu else cpu_stage
    fn.__name__ = fn.__qualname__ = f"{stage}_only"
    fn.__doc__ = _DOC.format(stage=stage) + (_GPU_DOC if gpu else "") + (_TRAIN_DOC if training else "")
    return dsl.pipeline(name=f"dinoflow-stage-{stage}", description=f"Run the {stage} stage alone.")(fn)


PIPELINES: dict[str, Callable[..., Any]] = {stage: stage_only(stage) for stage in STAGES}
