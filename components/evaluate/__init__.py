"""KFP component: the evaluate stage (k-NN and linear probes, report, model card)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Output

from dinoflow.kfp import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
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
    """Evaluate a backbone on the dataset's train/test splits."""
    from dinoflow.kfp import runtime

    res = runtime.run_component(
        "evaluate",
        spec_json,
        output_root,
        data_version,
        output_name,
        result.path,
        overrides_json=overrides_json,
        inputs={
            "backbone": backbone,
            "dataset": dataset,
        },
        split=split,
        test_split=test_split,
        student=student,
    )
    runtime.log_metrics(metrics, res)
    runtime.log_confusion(classification, res)
    runtime.copy_text(res.get("report_uri"), report.path)
    runtime.copy_text(res.get("model_card_uri"), model_card.path)
