"""KFP component: the pretrain stage (DINOv2 / MAE / SplitMask); multi-node specs run as a TrainJob."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Model],
    metrics: Output[Metrics],
    output_name: str = "pretrain",
    overrides_json: str = "{}",
    gpus: int = 0,
    nnodes: int = 0,
    arch: str = "",
    steps: int = 0,
    batch_size: int = 0,
    run_id: str = "",
    split: str = "train",
    manifest: Input[Artifact] = None,
    init: Input[Artifact] = None,
):
    """Pretrain a backbone on the manifest; init continues from an earlier backbone (retrain).

    gpus, nnodes, arch, steps and batch_size are the spec's nproc, nnodes, backbone, steps and
    batch_size unless spec_json sets them (0 or empty: not given; nnodes > 1: this task launches a
    Kubeflow TrainJob and waits on it); run_id names that job after the KFP run.
    """
    from dinoflow.kfp import runtime

    runtime.component_main("pretrain", locals(), inputs=("manifest", "init"))
