"""KFP component: the distill stage (frozen teacher -> smaller students); multi-node specs run as a TrainJob."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def distill(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Model],
    metrics: Output[Metrics],
    output_name: str = "distill",
    overrides_json: str = "{}",
    gpus: int = 0,
    nnodes: int = 0,
    students: str = "",
    steps: int = 0,
    batch_size: int = 0,
    run_id: str = "",
    split: str = "train",
    manifest: Input[Artifact] = None,
    teacher: Input[Artifact] = None,
):
    """Distill the teacher into the students named in the spec.

    gpus, nnodes, students (comma-separated), steps and batch_size are the spec's fields unless
    spec_json sets them (0 or empty: not given; nnodes > 1: this task launches a Kubeflow TrainJob and
    waits on it); run_id names that job after the KFP run.
    """
    from dinoflow.kfp import runtime

    runtime.component_main("distill", locals(), inputs=("manifest", "teacher"))
