"""KFP component: the distill stage (frozen teacher -> smaller students) on one node."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def distill(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Artifact],
    metrics: Output[Metrics],
    output_name: str = "distill",
    overrides_json: str = "{}",
    split: str = "train",
    manifest: Input[Artifact] = None,
    teacher: Input[Artifact] = None,
):
    """Distill the teacher into the students named in the spec."""
    from dinoflow.kfp import runtime

    runtime.component_main("distill", locals(), inputs=("manifest", "teacher"))
