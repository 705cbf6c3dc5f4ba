"""KFP component: the embed stage (manifest + backbone -> float16 embeddings)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def embed(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Artifact],
    metrics: Output[Metrics],
    output_name: str = "embed",
    overrides_json: str = "{}",
    split: str = "train",
    student: str = "",
    manifest: Input[Artifact] = None,
    backbone: Input[Artifact] = None,
):
    """Embed a manifest; without a backbone input or backbone_uri the stage bootstraps one."""
    from dinoflow.kfp import runtime

    runtime.component_main("embed", locals(), inputs=("manifest", "backbone"))
