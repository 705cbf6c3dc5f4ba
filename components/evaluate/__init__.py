"""KFP component: the evaluate stage (k-NN and linear probes, report, model card)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Output

from dinoflow.kfp import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    spec_json: str,
    output_root: str,
    data_version: str,
    result: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
    model_card: Output[Markdown],
    output_name: str = "evaluate",
    overrides_json: str = "{}",
    split: str = "train",
    test_split: str = "test",
    student: str = "",
    backbone: Input[Artifact] = None,
    dataset: Input[Artifact] = None,
):
    """Evaluate a backbone on the dataset's train/test splits (features on a GPU when there is one)."""
    from dinoflow.kfp import runtime

    runtime.component_main("evaluate", locals(), inputs=("backbone", "dataset"))
