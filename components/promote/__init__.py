"""KFP component: the promote stage (challenger becomes champion when it wins)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Model],
    metrics: Output[Metrics],
    output_name: str = "promote",
    overrides_json: str = "{}",
    student: str = "",
    model_name: str = "",
    registry_uri: str = "",
    backbone: Input[Artifact] = None,
    evaluation: Input[Artifact] = None,
):
    """Promote the evaluated backbone when it beats the registry's champion; model_name and
    registry_uri are the spec's unless spec_json sets them."""
    from dinoflow.kfp import runtime

    runtime.component_main("promote", locals(), inputs=("backbone", "evaluation"))
