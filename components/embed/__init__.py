"""KFP component: the embed stage (manifest + backbone -> float16 embeddings)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def embed(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Dataset],
    metrics: Output[Metrics],
    output_name: str = "embed",
    overrides_json: str = "{}",
    phase: str = "",
    part: int = 0,
    parts: int = 0,
    split: str = "train",
    student: str = "",
    manifest: Input[Artifact] = None,
    backbone: Input[Artifact] = None,
):
    """Embed a manifest; without a backbone input or backbone_uri the stage bootstraps one.

    phase ("plan" or "part" number ``part``) runs one fan-out phase of the stage; without it the
    stage runs and collects its parts (any not run yet run here). parts > 0 sets the spec's part count.
    """
    from dinoflow.kfp import runtime

    runtime.component_main("embed", locals(), inputs=("manifest", "backbone"))
